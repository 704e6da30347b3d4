"""The authors' generation loop against the continuous-batching engine, side by side in one run.

For one model (a `models.tiny` preset, or `--bundle DIR`), per engine dtype and SONAR backend:
the authors' loop (`reference_generate`, one prompt after another, no KV cache; float32, on
fairseq2 where `--sonar-backends` lists it; its sentences are the ground truth) runs in chunks
between engine rounds (a fresh `Engine(max_running=C)` and C closed-loop clients, for each
concurrency C), so a change of machine load hits every side alike. Both sides use the same
deterministic options. Exits 1 if a float32 engine's sentences differ from the authors' loop's.

    .venv/bin/python bench/engine.py [--quick] [--model tiny] [--concurrency 1,4,16,64]
    .venv/bin/python bench/engine.py --bundle DIR --dtypes float32,bfloat16 \
        --concurrency 1,4,16 --prompts 16 --max-sentences 2 --max-tokens 16 --stem engine-full

`--baseline-ref REF` instead compares this tree's engine with commit REF's, each round in a fresh
process, alternating (common.alternate); writes STEM-vs-REF.json.
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
    alternate,
    environment,
    fmt_s,
    in_worker_thread,
    loadavg,
    percentile,
    prepared,
    print_header,
    results_dir,
    write_json,
)
from reference import reference_generate

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions, SonarCodec
from server.engine import Engine, EngineConfig, FinalEvent, GenerationRequest, SentenceEvent

_WORDS = (
    "the a one old new red blue green quick lazy happy bright dark little cat dog fox bird "
    "tree river house garden city road sun moon star girl boy mother father friend teacher "
    "story book song game day night morning evening runs sees finds likes wants makes takes "
    "gives walks plays reads writes sings opens was is had will can went came saw found made "
    "and but then when after before with under over near far very always never often today "
    "yesterday tomorrow here there again"
).split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of 2-6 sentences (4-10 words each), the same for every run."""
    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        sentences = [
            " ".join(rng.choices(_WORDS, k=rng.randint(4, 10))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        prompts[" ".join(sentences)] = None
    return list(prompts)


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


@dataclass
class Record:
    """One request's outcome and timings (seconds)."""

    prompt: int
    sentences: list[str]
    finish_reason: str
    ttfs: float | None
    isl: list[float] = field(default_factory=list)  # between consecutive sentences


# ----- the authors' way ----------------------------------------------------------------------
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
        # The sentences' re-encodings are the last calls (then the EOS sentence's, on "stop").
        reenc = calls[: len(calls) - 1] if reason == "stop" else calls
        reenc = reenc[len(reenc) - len(sentences) :] if sentences else []
        times = [t - t0 for t, _ in reenc]
        if [texts for _, texts in reenc] != [[s] for s in sentences]:
            times = []  # unexpected call pattern: no per-sentence timings
        isl = [b - a for a, b in itertools.pairwise(times)]
        records.append(Record(i, sentences, reason, times[0] if times else None, isl))
    return records


# ----- the engine ----------------------------------------------------------------------------
async def engine_round(
    pipe: SonarLLMPipeline, prompts: list[str], concurrency: int, opts: GenerationOptions
) -> tuple[list[Record], float]:
    engine = Engine(pipe, EngineConfig(max_running=concurrency, max_waiting=len(prompts)))
    engine.start()
    todo = iter(range(len(prompts)))
    records: list[Record] = []

    async def client() -> None:
        for i in todo:  # shared iterator: each client takes the next prompt when free
            elapsed: list[float] = []
            final: FinalEvent | None = None
            async for ev in await engine.submit(
                prepared(engine, GenerationRequest(prompts[i], opts))
            ):
                if isinstance(ev, SentenceEvent):
                    elapsed.append(ev.elapsed)
                else:
                    final = ev
            assert final is not None
            isl = [b - a for a, b in itertools.pairwise(elapsed)]
            ttfs = final.usage.time_to_first_sentence
            records.append(Record(i, final.sentences, final.finish_reason, ttfs, isl))

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    if engine.error is not None:
        raise RuntimeError(f"engine died: {engine.error}")
    return sorted(records, key=lambda r: r.prompt), wall


def stats(records: list[Record]) -> dict[str, Any]:
    ttfs = [r.ttfs for r in records if r.ttfs is not None]
    isl = [x for r in records for x in r.isl]
    return {
        "requests": len(records),
        "sentences": sum(len(r.sentences) for r in records),
        "ttfs_p50": percentile(ttfs, 50),
        "isl_p50": percentile(isl, 50),
    }


def engine_row(
    records: list[Record], wall: float, reference: dict[int, Record], base_rate: float
) -> dict[str, Any]:
    """One engine round's figures, set against the authors' loop: sentences/s, speed-up, and
    the requests whose sentences and finish reason equal the reference's."""
    s = stats(records)
    compared = [r for r in records if r.prompt in reference]
    same = sum(
        (r.sentences, r.finish_reason)
        == (reference[r.prompt].sentences, reference[r.prompt].finish_reason)
        for r in compared
    )
    rate = s["sentences"] / wall
    return {
        "wall_s": wall,
        "sentences_per_s": rate,
        "speedup": rate / base_rate,
        **s,
        "compared": len(compared),
        "identical": same,
        "identical_share": same / len(compared) if compared else None,
    }


# ----- one model -----------------------------------------------------------------------------
@dataclass
class Workload:
    """What both sides run: the prompts, the engine's concurrencies, the options; the authors'
    loop runs the first `baseline_prompts`; an engine round at concurrency C runs the first
    max(baseline_prompts, per_client × C) prompts (all of them where per_client is 0)."""

    prompts: list[str]
    concurrency: list[int]
    opts: GenerationOptions
    baseline_prompts: int
    per_client: int = 0

    def for_round(self, concurrency: int) -> list[str]:
        n = max(self.baseline_prompts, self.per_client * concurrency)
        return self.prompts[:n] if self.per_client else self.prompts


Side = tuple[str, str]  # (dtype, SONAR backend)


def bench_model(
    name: str, pipes: dict[Side, SonarLLMPipeline], reference_side: Side, work: Workload
) -> dict[Side, dict[str, Any]]:
    """The authors' loop (on `pipes[reference_side]`) against the engine on every other pipe
    at every concurrency. The authors' loop runs in chunks between the engine rounds, so a
    change of machine load hits every side alike. One result per engine side."""
    prompts, opts = work.prompts, work.opts
    print(f"\n## {name}: the engine on {list(pipes)} vs the authors' loop on {reference_side}")
    # Warm-up: first calls pay one-off costs (imports, allocator, kernel selection).
    in_worker_thread(lambda: reference_generate(pipes[reference_side], prompts[0], opts))
    for pipe in pipes.values():
        asyncio.run(engine_round(pipe, prompts[:4], min(4, len(prompts)), opts))
    plan = [(c, v) for c in work.concurrency for v in pipes]
    indices = list(range(min(work.baseline_prompts, len(prompts))))
    bounds = [k * len(indices) // (len(plan) + 1) for k in range(len(plan) + 2)]
    ref_records: list[Record] = []
    ref_time = 0.0
    runs: dict[Side, list[tuple[int, list[Record], float, list[float]]]] = {v: [] for v in pipes}
    for k, (a, b) in enumerate(itertools.pairwise(bounds)):
        t0 = time.perf_counter()
        part = functools.partial(run_reference, pipes[reference_side], prompts, indices[a:b], opts)
        ref_records += in_worker_thread(part)
        ref_time += time.perf_counter() - t0
        done = sum(len(r.sentences) for r in ref_records)
        print(
            f"authors' way: {len(ref_records)}/{len(indices)} requests, {done} sentences in "
            f"{ref_time:.1f}s (load average {loadavg()})",
            flush=True,
        )
        if k < len(plan):
            c, v = plan[k]
            load0 = loadavg()
            records, wall = asyncio.run(engine_round(pipes[v], work.for_round(c), c, opts))
            runs[v].append((c, records, wall, load0))
            n = sum(len(r.sentences) for r in records)
            print(
                f"engine {v[0]} {v[1]} C={c}: {n} sentences in {wall:.1f}s = {n / wall:.2f}"
                f" sentences/s (load average {load0})",
                flush=True,
            )
    base = {"requests": len(ref_records), "wall_s": ref_time, **stats(ref_records)}
    base["sentences_per_s"] = rate = base["sentences"] / ref_time
    base["records"] = [asdict(r) for r in ref_records]
    reference = {r.prompt: r for r in ref_records}
    results = {}
    for (dtype, backend), side_runs in runs.items():
        rounds = [
            {"concurrency": c, "prompts": len(rs), "loadavg": load0}
            | engine_row(rs, wall, reference, rate)
            for c, rs, wall, load0 in side_runs
        ]
        results[(dtype, backend)] = {
            "model": name,
            "dtype": dtype,
            "sonar_backend": backend,
            "baseline": base,
            "engine": rounds,
        }
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    def row(label: str, conc: int, r: dict[str, Any], speedup: float, same: str) -> None:
        cells = (r["sentences"], f"{r['wall_s']:.1f}", f"{r['sentences_per_s']:.2f}")
        times = (f"{speedup:.1f}x", fmt_s(r["ttfs_p50"]), fmt_s(r["isl_p50"]))
        print(f"{label:28}{conc:>5}" + "".join(f"{x:>9}" for x in cells + times) + f"  {same}")

    headings = ("sent", "wall s", "sent/s", "speed-up", "TTFS p50", "ISL p50")
    print(f"\n{'side':28}{'conc':>5}" + "".join(f"{h:>9}" for h in headings) + "  outputs")
    row(f"{results[0]['model']} authors fp32", 1, results[0]["baseline"], 1.0, "ground truth")
    for res in results:
        for r in res["engine"]:
            label = f"{res['model']} {res['dtype']} {res['sonar_backend']}"
            row(label, r["concurrency"], r, r["speedup"], f"{r['identical']}/{r['compared']} same")


# ----- this tree's engine against an earlier commit's ---------------------------------------
def _worker(bundle: str, device: str, dtype: str, c: str, n: str, opts: str) -> dict[str, Any]:
    """One engine round in this process, on whatever tree PYTHONPATH names (its pipeline's
    default SONAR backend: an earlier commit may know no other)."""
    pipe = SonarLLMPipeline.load(bundle, device=device, dtype=dtype)
    max_sentences, max_tokens, beam = map(int, opts.split(","))
    decode = DecodeOptions(beam_size=beam, max_tokens=max_tokens)
    gen = GenerationOptions(max_sentences=max_sentences, decode=decode)
    prompts = make_prompts(int(n))
    asyncio.run(engine_round(pipe, prompts[:4], 4, gen))  # warm-up
    records, wall = asyncio.run(engine_round(pipe, prompts, int(c), gen))
    sentences = [r.sentences for r in records]
    return {"wall_s": wall, "sentences_per_s": sum(map(len, sentences)) / wall, "texts": sentences}


def against_ref(args: argparse.Namespace, bundle: Path, ref: str, n: int) -> dict[str, Any]:
    """This tree's engine and `ref`'s, each round in a fresh process, alternating: the median
    sentences/s of each and whether they wrote the same sentences, per concurrency."""
    out: dict[str, Any] = {}
    opts = f"{args.max_sentences},{args.max_tokens},{args.beam}"
    for c in args.conc:
        worker: list[object] = [bundle, args.device, args.dtypes.split(",")[0], c, n, opts]
        runs = alternate(__file__, worker, [ref], args.rounds)
        rate = {k: v["sentences_per_s"] for k, v in runs.items()}
        same = runs["this tree"]["runs"][0]["texts"] == runs[ref]["runs"][0]["texts"]
        out[str(c)] = {"sentences_per_s": rate, "same_sentences": same}
        print(
            f"C={c}: this tree {rate['this tree']:.2f} sentences/s, {ref} {rate[ref]:.2f} "
            f"({rate['this tree'] / rate[ref]:.2f}x); same sentences: {same}",
            flush=True,
        )
    return out


# ----- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        print(json.dumps(_worker(*sys.argv[2:8])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 16 prompts")
    ap.add_argument("--model", default="tiny", help="a models.tiny preset (tiny, small, full)")
    ap.add_argument("--bundle", type=Path, help="instead: this bundle")
    ap.add_argument("--concurrency", default=None, help="comma-separated, e.g. 1,4,16,64")
    ap.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 64)")
    ap.add_argument("--baseline-prompts", type=int, default=None, help="the authors' way's")
    ap.add_argument("--max-sentences", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48, help="SONAR decoder token cap")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32", help="engine dtypes, e.g. float32,bfloat16")
    ap.add_argument("--sonar-backends", default=None, help="e.g. native,fairseq2")
    ap.add_argument("--baseline-ref", help="instead: this tree's engine against this commit's")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline-ref: rounds")
    ap.add_argument("--stem", default="engine", help="output file: STEM.json")
    args = ap.parse_args(argv)
    conc = args.concurrency or ("1,4,16" if args.quick else "1,4,16,64")
    args.conc = [int(c) for c in conc.split(",")]
    n = args.prompts or (16 if args.quick else 64)
    decode = DecodeOptions(beam_size=args.beam, max_tokens=args.max_tokens)
    opts = GenerationOptions(max_sentences=args.max_sentences, decode=decode)
    prompts = make_prompts(n)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("SONAR-LLM engine vs the authors' one-at-a-time loop")
    print(
        f"# {n} prompts of 2-6 sentences; max_sentences {args.max_sentences}, beam "
        f"{args.beam}, max_tokens {args.max_tokens}, greedy latent, both sides"
    )
    t_start = time.perf_counter()
    if args.bundle:  # named by preset and SONAR-LLM size, e.g. full-100m
        bundle, meta = args.bundle, json.loads((args.bundle / tiny.BUNDLE_FILE).read_text())
        name = "-".join(str(meta[k]) for k in ("preset", "llm") if meta.get(k)) or bundle.name
    else:
        name, bundle = (
            args.model,
            bundle_for(args.model, Path(tempfile.gettempdir()) / "sonar-bench"),
        )
    if args.baseline_ref:
        ref = args.baseline_ref
        settings = {k: str(v) for k, v in vars(args).items()}
        vs = {name: against_ref(args, bundle, ref, n)}
        out = {"environment": environment(), "settings": settings, "engine_vs_ref": vs}
        write_json(results_dir(args.quick) / f"{args.stem}-vs-{ref}.json", out)
        return 0
    from models.sonar_codec import DEFAULT_BACKEND  # (an earlier commit's worker has none)

    dtypes, backends = args.dtypes.split(","), (args.sonar_backends or DEFAULT_BACKEND).split(",")
    reference_side = ("float32", "fairseq2" if "fairseq2" in backends else backends[0])
    work = Workload(prompts, args.conc, opts, args.baseline_prompts or n)
    sides = [(dtype, backend) for dtype in dtypes for backend in backends]
    pipes = {
        (dtype, backend): SonarLLMPipeline.load(
            str(bundle), device=args.device, dtype=dtype, sonar_backend=backend
        )
        for dtype, backend in dict.fromkeys([reference_side, *sides])
    }
    by_side = bench_model(name, pipes, reference_side, work)
    results = [by_side[v] for v in sides]
    print_table(results)
    settings = {k: v for k, v in vars(args).items() if k != "bundle"}
    data: dict[str, Any] = {"environment": environment(), "settings": settings, "prompts": prompts}
    data |= {"results": results, "wall_seconds": round(time.perf_counter() - t_start, 1)}
    path = results_dir(args.quick) / f"{args.stem}.json"
    write_json(path, data)
    print(f"wrote {path} ({data['wall_seconds']}s)")
    fp32 = [e for r in results if r["dtype"] == "float32" for e in r["engine"]]
    differ = [e for e in fp32 if e["identical"] < e["compared"]]
    if differ:
        print("FAIL: a float32 engine's sentences differ from the authors' loop's")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
