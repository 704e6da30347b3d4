"""The authors' generation loop vs the continuous-batching engine at 1, 4, 16 and 64 requests.

Goals at 16 concurrent requests, side by side in one run, on a 2-core CPU:
  tiny/small bundles (engine issue): the engine ≥ 8× the one-at-a-time loop's sentences/s, with
  identical outputs;
  the full-size bundle (speed issue; released sizes, SONAR-LLM 100M): fp32 ≥ 4× with identical
  outputs, bf16 ≥ 12× the authors' fp32 loop, with the share of identical requests reported.

Per model (`models.tiny` presets: tiny, small, full; or `--bundle DIR`, e.g. a bundle built by
`sonar-llm tiny DIR --preset full`) and per engine dtype (`--dtypes float32,bfloat16`):
  authors' way: `reference_generate` (tests/reference.py) over every prompt in turn (no KV cache,
                batch 1, one embedding per fairseq2 beam-search call), always in float32 as
                released; its outputs are the ground truth for every dtype.
  engine:       for each concurrency C, a fresh `Engine(max_running=C)` and C closed-loop
                clients that each submit their next prompt as soon as their last one ends,
                until all prompts are done (every round generates for the same prompts).
Both sides use the same deterministic options (beam search, greedy latent).

    .venv/bin/python bench/engine.py [--quick] [--models tiny,small] [--concurrency 1,4,16,64]
    .venv/bin/python bench/engine.py --bundle /path/to/full --dtypes float32,bfloat16 \
        --concurrency 1,4,16 --prompts 16 --max-sentences 2 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # the authors' loop
from common import (
    RESULTS_DIR,
    environment,
    fmt_s,
    in_worker_thread,
    loadavg,
    percentile,
    print_header,
    pyplot,
    write_json,
)
from reference import reference_generate

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DEFAULT_BACKEND, DecodeOptions, SonarCodec
from server.engine import Engine, EngineConfig, FinalEvent, GenerationRequest, SentenceEvent

GOAL_CONCURRENCY = 16
#: Speed-up goals at GOAL_CONCURRENCY by (preset, engine dtype); other presets: DEFAULT_GOAL.
GOALS: dict[tuple[str, str], float] = {("full", "float32"): 4.0, ("full", "bfloat16"): 12.0}
DEFAULT_GOAL = 8.0
HEADER = """\
# authors' way = tests/reference.py's reference_generate, one request after another (no KV cache,
#   batch 1), on a worker thread as the engine's loop runs on one; it runs in chunks between the
#   engine rounds so that machine-load changes hit both sides. Its sentences/s does not depend on
#   how many requests wait, so it is measured once, in float32 (as released), and is the ground
#   truth for every engine dtype.
#   'authors, alone' = TTFS/ISL of each request run by itself;
#   'authors, FIFO*' = the TTFS that C clients would see queueing at that one-at-a-time server
#   (simulated from the measured per-request times).
# engine = server.engine.Engine(max_running=C), fresh per round (empty encoder cache); C
#   closed-loop clients (each submits its next prompt when its last one ends) until all {n}
#   prompts are done. TTFS from FinalEvent.usage, ISL from consecutive SentenceEvent.elapsed.
#   Outputs are compared with the authors' way per prompt."""
_WORDS = (
    "the a one old new red blue green quick lazy happy bright dark little cat dog fox bird "
    "tree river house garden city road sun moon star girl boy mother father friend teacher "
    "story book song game day night morning evening runs sees finds likes wants makes takes "
    "gives walks plays reads writes sings opens was is had will can went came saw found made "
    "and but then when after before with under over near far very always never often today "
    "yesterday tomorrow here there again"
).split()


# ----- workload ------------------------------------------------------------------------------
def make_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of 2-6 sentences (4-10 words each), the same for every run."""
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < n:
        sentences = [
            " ".join(rng.choices(_WORDS, k=rng.randint(4, 10))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        text = " ".join(sentences)
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


def bundle_for(preset: str, cache_dir: Path) -> Path:
    """The bundle of `preset`, built once under `cache_dir` (keyed by the preset's sizes)."""
    key = hashlib.sha1(repr(tiny.PRESETS[preset]).encode()).hexdigest()[:10]
    root = cache_dir / f"{preset}-{key}"
    if not tiny.is_bundle(root):
        print(f"# building the {preset} bundle in {root} ...", flush=True)
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        tiny.build(tmp, preset=preset)
        try:
            tmp.rename(root)
        except OSError:  # another run built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def bundle_preset(bundle: Path) -> str | None:
    """The `models.tiny` preset a bundle was built with (None for older bundles)."""
    preset = json.loads((bundle / tiny.BUNDLE_FILE).read_text()).get("preset")
    return preset if isinstance(preset, str) else None


def bundle_name(bundle: Path) -> str:
    """A bundle's name in the tables: its preset and SONAR-LLM size (e.g. full-100m)."""
    meta = json.loads((bundle / tiny.BUNDLE_FILE).read_text())
    return "-".join(str(meta[k]) for k in ("preset", "llm") if meta.get(k)) or bundle.name


# ----- the authors' way ----------------------------------------------------------------------
@dataclass
class Record:
    """One request's outcome and timings (seconds)."""

    prompt: int
    sentences: list[str]
    finish_reason: str
    total: float
    ttfs: float | None
    isl: list[float] = field(default_factory=list)  # between consecutive sentences
    queue: float | None = None
    tokens: int | None = None  # decoder tokens (engine: `Usage.decoded_tokens`)


@contextlib.contextmanager
def encode_times(codec: SonarCodec) -> Iterator[list[tuple[float, list[str]]]]:
    """Record (end time, texts) of every `codec.encode` call: the reference loop returns only at
    the end, but each of its sentences is final once its re-encoding returns."""
    calls: list[tuple[float, list[str]]] = []
    original = codec.encode

    def encode(texts: Sequence[str], lang: str) -> torch.Tensor:
        out = original(texts, lang)
        calls.append((time.perf_counter(), list(texts)))
        return out

    codec.encode = encode  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del codec.encode  # back to the class's method


def run_reference(
    pipe: SonarLLMPipeline, prompts: list[str], indices: list[int], opts: GenerationOptions
) -> list[Record]:
    records = []
    for i in indices:
        with encode_times(pipe.codec) as calls:
            t0 = time.perf_counter()
            sentences, reason = reference_generate(pipe, prompts[i], opts)
            total = time.perf_counter() - t0
        # The sentences' re-encodings are the last calls (then the EOS sentence's, on "stop").
        reenc = calls[: len(calls) - 1] if reason == "stop" else calls
        reenc = reenc[len(reenc) - len(sentences) :] if sentences else []
        times = [t - t0 for t, texts in reenc]
        if [texts for _, texts in reenc] != [[s] for s in sentences]:
            times = []  # unexpected call pattern: no per-sentence timings
        records.append(
            Record(
                prompt=i,
                sentences=sentences,
                finish_reason=reason,
                total=total,
                ttfs=times[0] if times else None,
                isl=[b - a for a, b in itertools.pairwise(times)],
                queue=0.0,
            )
        )
    return records


def serial_ttfs(records: list[Record], concurrency: int, n: int) -> list[float]:
    """TTFS if C closed-loop clients sent `n` requests to a one-at-a-time server (FIFO):
    request j arrives when request j-C ends and starts when request j-1 ends (measured times)."""
    if not records:
        return []
    durations = [records[j % len(records)].total for j in range(n)]
    ends: list[float] = []
    out: list[float] = []
    for j in range(n):
        arrive = 0.0 if j < concurrency else ends[j - concurrency]
        start = max(arrive, ends[j - 1] if j else 0.0)
        ends.append(start + durations[j])
        ttfs = records[j % len(records)].ttfs
        if ttfs is not None:
            out.append(start - arrive + ttfs)
    return out


# ----- the engine ----------------------------------------------------------------------------
async def _engine_round(
    pipe: SonarLLMPipeline, prompts: list[str], concurrency: int, opts: GenerationOptions
) -> tuple[list[Record], float]:
    engine = Engine(pipe, EngineConfig(max_running=concurrency, max_waiting=len(prompts)))
    engine.start()
    todo = iter(range(len(prompts)))
    records: list[Record] = []

    async def client() -> None:
        for i in todo:  # shared iterator: each client takes the next prompt when free
            t0 = time.perf_counter()
            events = await engine.submit(GenerationRequest(prompts[i], opts))
            elapsed: list[float] = []
            final: FinalEvent | None = None
            async for ev in events:
                if isinstance(ev, SentenceEvent):
                    elapsed.append(ev.elapsed)
                else:
                    final = ev
            assert final is not None
            records.append(
                Record(
                    prompt=i,
                    sentences=final.sentences,
                    finish_reason=final.finish_reason,
                    total=time.perf_counter() - t0,
                    ttfs=final.usage.time_to_first_sentence,
                    isl=[b - a for a, b in itertools.pairwise(elapsed)],
                    queue=final.usage.queue_time,
                    tokens=final.usage.decoded_tokens,
                )
            )

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    if engine.error is not None:
        raise RuntimeError(f"engine died: {engine.error}")
    return sorted(records, key=lambda r: r.prompt), wall


def run_engine(
    pipe: SonarLLMPipeline, prompts: list[str], concurrency: int, opts: GenerationOptions
) -> tuple[list[Record], float]:
    return asyncio.run(_engine_round(pipe, prompts, concurrency, opts))


# ----- one model -----------------------------------------------------------------------------
def stats(records: list[Record]) -> dict[str, Any]:
    ttfs = [r.ttfs for r in records if r.ttfs is not None]
    isl = [x for r in records for x in r.isl]
    tokens = [r.tokens for r in records if r.tokens is not None]
    return {
        "requests": len(records),
        "sentences": sum(len(r.sentences) for r in records),
        "decoded_tokens": sum(tokens) if len(tokens) == len(records) else None,
        "ttfs_p50": percentile(ttfs, 50),
        "ttfs_p99": percentile(ttfs, 99),
        "isl_p50": percentile(isl, 50),
        "isl_p99": percentile(isl, 99),
    }


def compare(reference: dict[int, Record], records: list[Record]) -> list[dict[str, Any]]:
    """Requests whose sentences or finish reason differ from the reference's."""
    bad = []
    for r in records:
        ref = reference.get(r.prompt)
        if ref is not None and (ref.sentences, ref.finish_reason) != (
            r.sentences,
            r.finish_reason,
        ):
            bad.append(
                {
                    "prompt": r.prompt,
                    "reference": ref.sentences,
                    "reference_finish": ref.finish_reason,
                    "engine": r.sentences,
                    "engine_finish": r.finish_reason,
                }
            )
    return bad


def _load(bundle: Path, device: str, dtype: str, backend: str) -> SonarLLMPipeline:
    t_load = time.perf_counter()
    pipe = SonarLLMPipeline.load(str(bundle), device=device, dtype=dtype, sonar_backend=backend)
    cfg = pipe.model.config
    print(
        f"# loaded {bundle} ({device} {dtype}, SONAR backend {backend}): "
        f"SONAR {pipe.codec.embed_dim}-d, SonarLLM hidden "
        f"{cfg.hidden_size} × {cfg.num_hidden_layers} layers, in "
        f"{time.perf_counter() - t_load:.1f}s",
        flush=True,
    )
    return pipe


def bench_model(
    name: str,
    bundle: Path,
    device: str,
    dtypes: list[str],
    prompts: list[str],
    concurrency: list[int],
    opts: GenerationOptions,
    baseline_n: int,
    backends: list[str] = [DEFAULT_BACKEND],  # noqa: B006 (read only)
) -> list[dict[str, Any]]:
    """One model: the authors' fp32 loop against the engine in every dtype and SONAR backend at
    every concurrency, all in one run. Returns one result per (dtype, backend); they share the
    baseline, which runs on the fairseq2 backend when it is among `backends` (fairseq2's own
    beam search, as the authors decode)."""
    print(
        f"\n## model {name}: engine in {', '.join(dtypes)} with SONAR backends "
        f"{', '.join(backends)} against the authors' float32 loop"
    )
    ref_backend = "fairseq2" if "fairseq2" in backends else backends[0]
    variants = [(dtype, backend) for dtype in dtypes for backend in backends]
    pipes = {("float32", ref_backend): _load(bundle, device, "float32", ref_backend)}
    for v in variants:
        if v not in pipes:
            pipes[v] = _load(bundle, device, *v)
    reference_pipe = pipes[("float32", ref_backend)]
    # Warm-up: first calls pay one-off costs (imports, allocator, kernel selection).
    warm = prompts[: min(4, len(prompts))]
    in_worker_thread(lambda: reference_generate(reference_pipe, warm[0], opts))
    for v in variants:
        run_engine(pipes[v], warm, len(warm), opts)

    # The engine rounds for the dtypes at one concurrency run back to back; the authors' way runs
    # in chunks between all rounds, so a change in machine load during the run (other processes)
    # hits every side alike.
    plan = [(c, v) for c in concurrency for v in variants]
    indices = list(range(min(baseline_n, len(prompts))))
    parts = len(plan) + 1
    bounds = [k * len(indices) // parts for k in range(parts + 1)]
    chunks = [indices[a:b] for a, b in itertools.pairwise(bounds)]
    ref_records: list[Record] = []
    ref_time = 0.0
    engine_runs: dict[tuple[str, str], list[tuple[int, list[Record], float, list[float]]]] = {
        v: [] for v in variants
    }
    for k in range(parts):
        t0 = time.perf_counter()
        ref_records += in_worker_thread(
            functools.partial(run_reference, reference_pipe, prompts, chunks[k], opts)
        )
        ref_time += time.perf_counter() - t0
        done = sum(len(r.sentences) for r in ref_records)
        print(
            f"authors' way: {len(ref_records)}/{len(indices)} requests done, {done} sentences in "
            f"{ref_time:.1f}s (load average {loadavg()})",
            flush=True,
        )
        if k < len(plan):
            c, v = plan[k]
            load0 = loadavg()
            records, wall = run_engine(pipes[v], prompts, c, opts)
            engine_runs[v].append((c, records, wall, load0))
            n_sent = sum(len(r.sentences) for r in records)
            print(
                f"engine {v[0]} {v[1]} C={c}: {n_sent} sentences in {wall:.1f}s = "
                f"{n_sent / wall:.2f} "
                f"sentences/s (load average {load0})",
                flush=True,
            )
    base = stats(ref_records)
    base_rate = base["sentences"] / ref_time
    reference = {r.prompt: r for r in ref_records}
    baseline_rows = []
    for c in concurrency:
        sim = serial_ttfs(ref_records, c, len(prompts))
        baseline_rows.append(
            {
                "concurrency": c,
                "ttfs_p50": percentile(sim, 50),
                "ttfs_p99": percentile(sim, 99),
            }
        )
    baseline = {
        "dtype": "float32",
        "requests": len(indices),
        "wall_s": ref_time,
        "sentences_per_s": base_rate,
        "isolated": base,
        "serial_ttfs_by_concurrency": baseline_rows,
        "records": [asdict(r) for r in ref_records],
    }
    preset = bundle_preset(bundle)
    results = []
    for dtype, backend in variants:
        rounds: list[dict[str, Any]] = []
        for c, records, wall, load0 in engine_runs[(dtype, backend)]:
            s = stats(records)
            mismatches = compare(reference, records)
            rate = s["sentences"] / wall
            compared = sum(1 for r in records if r.prompt in reference)
            rounds.append(
                {
                    "concurrency": c,
                    "wall_s": wall,
                    "sentences_per_s": rate,
                    "speedup": rate / base_rate,
                    **s,
                    "tokens_per_s": None
                    if s["decoded_tokens"] is None
                    else s["decoded_tokens"] / wall,
                    "queue_p50": percentile([r.queue for r in records if r.queue is not None], 50),
                    "compared": compared,
                    "mismatches": len(mismatches),
                    "identical_share": (compared - len(mismatches)) / compared
                    if compared
                    else None,
                    "mismatch_examples": mismatches[:3],
                    "loadavg": load0,
                }
            )
        pipe = pipes[(dtype, backend)]
        result = {
            "model": name,
            "preset": preset,
            "bundle": str(bundle),
            "device": device,
            "dtype": dtype,
            "sonar_backend": backend,
            "sonar_dim": pipe.codec.embed_dim,
            "sonar_llm_config": pipe.model.config.to_json_dict(),
            "baseline": baseline,
            "engine": rounds,
            "goal": goal(rounds, base_rate, preset, dtype),
        }
        print_table(result)
        results.append(result)
    backend_ratios(results)
    return results


def backend_ratios(results: list[dict[str, Any]]) -> None:
    """Native over fairseq2 sentences/s per dtype and concurrency (the same prompts, side by
    side in this run), stored on the native results and printed."""
    by = {(r["dtype"], r["sonar_backend"]): r for r in results}
    for (dtype, backend), res in by.items():
        other = by.get((dtype, "fairseq2"))
        if backend != "native" or other is None:
            continue
        theirs = {r["concurrency"]: r["sentences_per_s"] for r in other["engine"]}
        ratios = {
            r["concurrency"]: r["sentences_per_s"] / theirs[r["concurrency"]]
            for r in res["engine"]
            if theirs.get(r["concurrency"])
        }
        res["native_over_fairseq2"] = ratios
        line = ", ".join(f"C={c}: {x:.2f}x" for c, x in ratios.items())
        print(f"# {res['model']} {dtype}: native / fairseq2 engine sentences/s: {line}")


def goal(
    rounds: list[dict[str, Any]], base_rate: float, preset: str | None, dtype: str
) -> dict[str, Any]:
    """The goal at GOAL_CONCURRENCY. Outputs must be identical in float32; in other dtypes the
    identical share is reported, not required (rounding may tip a beam)."""
    target = GOALS.get((preset or "", dtype), DEFAULT_GOAL)
    at = next((r for r in rounds if r["concurrency"] == GOAL_CONCURRENCY), None)
    identical = all(r["mismatches"] == 0 for r in rounds)
    speedup = None if at is None else at["sentences_per_s"] / base_rate
    must_match = dtype == "float32"
    return {
        "concurrency": GOAL_CONCURRENCY,
        "speedup_goal": target,
        "speedup": speedup,
        "identical_outputs": identical,
        "identical_share": None if at is None else at["identical_share"],
        "identical_required": must_match,
        "passed": speedup is not None and speedup >= target and (identical or not must_match),
    }


def print_table(result: dict[str, Any]) -> None:
    b = result["baseline"]
    print(
        f"\n{'':14}{'conc':>5} {'sent':>5} {'wall s':>7} {'sent/s':>7} {'speed-up':>8} "
        f"{'TTFS p50':>9} {'TTFS p99':>9} {'ISL p50':>8} {'ISL p99':>8}  outputs"
    )
    iso = b["isolated"]
    print(
        f"{'authors, alone':14}{1:>5} {iso['sentences']:>5} {b['wall_s']:>7.1f} "
        f"{b['sentences_per_s']:>7.2f} {'1.0x':>8} {fmt_s(iso['ttfs_p50']):>9} "
        f"{fmt_s(iso['ttfs_p99']):>9} {fmt_s(iso['isl_p50']):>8} {fmt_s(iso['isl_p99']):>8}"
        "  ground truth"
    )
    for row in b["serial_ttfs_by_concurrency"]:
        print(
            f"{'authors, FIFO*':14}{row['concurrency']:>5} {'':>5} {'':>7} "
            f"{b['sentences_per_s']:>7.2f} {'1.0x':>8} {fmt_s(row['ttfs_p50']):>9} "
            f"{fmt_s(row['ttfs_p99']):>9} {fmt_s(iso['isl_p50']):>8} {fmt_s(iso['isl_p99']):>8}"
        )
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    backend = result.get("sonar_backend", "fairseq2")
    label = f"engine {short.get(result['dtype'], result['dtype'])} {backend}"
    for r in result["engine"]:
        same = "MATCH" if r["mismatches"] == 0 else f"{r['mismatches']}/{r['compared']} differ"
        if r.get("decoded_tokens") and r["sentences"]:
            same += f" ({r['decoded_tokens'] / r['sentences']:.1f} tokens/sentence)"
        print(
            f"{label:14}{r['concurrency']:>5} {r['sentences']:>5} {r['wall_s']:>7.1f} "
            f"{r['sentences_per_s']:>7.2f} {r['speedup']:>7.1f}x {fmt_s(r['ttfs_p50']):>9} "
            f"{fmt_s(r['ttfs_p99']):>9} {fmt_s(r['isl_p50']):>8} {fmt_s(r['isl_p99']):>8}  {same}"
        )
    print(f"{'PASS' if result['goal']['passed'] else 'FAIL'} {goal_line(result)}")


def goal_line(result: dict[str, Any]) -> str:
    g = result["goal"]
    sp = "-" if g["speedup"] is None else f"{g['speedup']:.1f}x"
    if g["identical_outputs"]:
        outputs = "outputs identical"
    elif g.get("identical_share") is not None:
        outputs = f"{g['identical_share']:.0%} of requests identical at C={g['concurrency']}"
        if g.get("identical_required", True):
            outputs += " (must be all)"
    else:
        outputs = "outputs NOT identical"
    return (
        f"[{result['model']}, {result['device']} engine {result['dtype']} "
        f"{result.get('sonar_backend', 'fairseq2')}]: at "
        f"C={g['concurrency']} {sp} the authors' float32 sentences/s "
        f"(goal ≥ {g['speedup_goal']:.0f}x), {outputs}"
    )


# ----- plot ----------------------------------------------------------------------------------
def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, (ax_rate, ax_ttfs, ax_isl) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ticks = sorted({r["concurrency"] for res in results for r in res["engine"]})
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    # Minor ticks: label only 2× and 5× a power of ten, so the labels do not overlap.
    sparse = FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
    for k, res in enumerate(results):
        color = colors[k % len(colors)]
        label = f"{res['model']} ({res['device']} {res['dtype']} {res.get('sonar_backend', '')})"
        rounds = res["engine"]
        xs = [r["concurrency"] for r in rounds]
        ax_rate.plot(xs, [r["sentences_per_s"] for r in rounds], "o-", color=color, label=label)
        for ax, key in ((ax_ttfs, "ttfs"), (ax_isl, "isl")):
            for q, style in (("p50", "o-"), ("p99", "^:")):
                ax.plot(
                    xs,
                    [r[f"{key}_{q}"] for r in rounds],
                    style,
                    color=color,
                    label=f"{res['model']} engine {res['dtype']} {q}",
                )
        if any(prev["model"] == res["model"] for prev in results[:k]):
            continue  # the authors' float32 loop is shared by a model's dtypes: drawn once
        ax_rate.axhline(
            res["baseline"]["sentences_per_s"],
            color=color,
            linestyle="--",
            label=f"{res['model']}: authors' way",
        )
        base_ttfs = res["baseline"]["serial_ttfs_by_concurrency"]
        ax_ttfs.plot(
            [r["concurrency"] for r in base_ttfs],
            [r["ttfs_p50"] for r in base_ttfs],
            "x--",
            color=color,
            alpha=0.6,
            label=f"{res['model']} authors' way p50 (FIFO)",
        )
        ax_isl.axhline(
            res["baseline"]["isolated"]["isl_p50"] or 0,
            color=color,
            linestyle="--",
            alpha=0.6,
            label=f"{res['model']} authors' way p50",
        )
    for ax, title, ylabel in (
        (ax_rate, "throughput", "sentences / s"),
        (ax_ttfs, "time to first sentence", "seconds"),
        (ax_isl, "inter-sentence latency", "seconds"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 16 prompts")
    ap.add_argument("--models", default=None, help="comma-separated presets (tiny,small,full)")
    ap.add_argument(
        "--bundle",
        type=Path,
        action="append",
        default=[],
        help="an existing bundle to run (repeatable; e.g. one `sonar-llm tiny DIR --preset full` "
        "built); with --bundle, --models defaults to none",
    )
    ap.add_argument("--concurrency", default=None, help="comma-separated, e.g. 1,4,16,64")
    ap.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 64)")
    ap.add_argument(
        "--baseline-prompts", type=int, default=None, help="prompts the authors' way runs (all)"
    )
    ap.add_argument("--max-sentences", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48, help="SONAR decoder token cap")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--dtypes",
        default="float32",
        help="comma-separated engine dtypes run side by side, e.g. float32,bfloat16 (the "
        "authors' loop always runs float32)",
    )
    ap.add_argument(
        "--sonar-backends",
        default=DEFAULT_BACKEND,
        help="comma-separated SONAR backends the engine runs side by side, e.g. native,fairseq2 "
        "(the authors' loop runs on fairseq2 when it is listed)",
    )
    ap.add_argument(
        "--bundle-dir", type=Path, default=Path(tempfile.gettempdir()) / "sonar-llm-bench"
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--stem", default="engine", help="output file names: STEM.json, STEM.png")
    ap.add_argument(
        "--plot-only", action="store_true", help="redraw STEM.png from STEM.json in --out"
    )
    args = ap.parse_args(argv)
    json_path, png_path = args.out / f"{args.stem}.json", args.out / f"{args.stem}.png"
    if args.plot_only:
        plot(json.loads(json_path.read_text())["results"], png_path)
        return 0
    default_models = "" if args.bundle else "tiny" if args.quick else "tiny,small"
    models = [m for m in (args.models or default_models).split(",") if m]
    dtypes = args.dtypes.split(",")
    backends = args.sonar_backends.split(",")
    conc_arg = args.concurrency or ("1,4,16" if args.quick else "1,4,16,64")
    conc = [int(c) for c in conc_arg.split(",")]
    n = args.prompts or (16 if args.quick else 64)
    baseline_n = args.baseline_prompts or n
    opts = GenerationOptions(
        max_sentences=args.max_sentences,
        decode=DecodeOptions(beam_size=args.beam, max_tokens=args.max_tokens),
    )
    prompts = make_prompts(n)
    if args.threads:
        torch.set_num_threads(args.threads)

    print_header("SONAR-LLM engine vs the authors' one-at-a-time loop")
    print(
        f"# workload: {n} distinct prompts of 2-6 sentences; max_sentences {args.max_sentences}, "
        f"beam {args.beam}, max_tokens {args.max_tokens}, greedy latent (same options both sides)"
    )
    print(HEADER.format(n=n))
    t_start = time.perf_counter()
    runs = [(name, bundle_for(name, args.bundle_dir)) for name in models]
    runs += [(bundle_name(bundle), bundle) for bundle in args.bundle]
    results = []
    for name, bundle in runs:
        results += bench_model(
            name, bundle, args.device, dtypes, prompts, conc, opts, baseline_n, backends
        )

    print("\n# summary")
    for res in results:
        print(f"{'PASS' if res['goal']['passed'] else 'FAIL'}  {goal_line(res)}")
    data = {
        "benchmark": "engine",
        "environment": environment(),
        "quick": args.quick,
        "settings": {
            "prompts": n,
            "baseline_prompts": baseline_n,
            "concurrency": conc,
            "dtypes": dtypes,
            "sonar_backends": backends,
            "threads": torch.get_num_threads(),
            "options": {
                "max_sentences": args.max_sentences,
                "beam_size": args.beam,
                "max_tokens": args.max_tokens,
            },
            "engine_load": "closed loop: C clients, each submits its next prompt when its last "
            "ends; fresh Engine(max_running=C) per round",
        },
        "prompts": prompts,
        "cuda_present": torch.cuda.is_available(),
        "results": results,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(json_path, data)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} ({data['wall_seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
