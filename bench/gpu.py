"""One command that measures a GPU: the full-size bundle, checked and timed, in a few minutes.

Phases, each timed and printed, gpu.json written after each (a run cut short keeps what it
measured); none starts after `--budget-s` seconds:
  bundle        the full-size random-weight bundle (preset "full", SONAR-LLM 100M), built once
                in `--cache-dir` (or `--bundle DIR`).
  beam_check    fp32, where fairseq2 is installed: our batched beam search against fairseq2's
                generator on the same embeddings at a few batch sizes: text, token count, and
                score to a relative 1e-5, as tests/models/test_beam_search.py checks them.
  cpu_match     fp32: the same native code on the device and on this machine's CPU.
  engine        bench/engine.py's comparison: the authors' loop (fp32, `--baseline-prompts`,
                the ground truth) in chunks between engine rounds with C closed-loop clients in
                each dtype: sentences/s, speed-up, and the requests equal to the reference.
  decoder_step  `DecodeBatch.step()` with B beams kept running (bench/decoder_step.py): time
                per step, FLOPs counted from the decoder's shapes, achieved FLOP/s against the
                device's peak and roofline.

Goals (the issue's): the bf16 decoder step within 3x of the device's roofline; the bf16 engine at
64 clients at least 50x the authors' loop; fp32 beam search equal to fairseq2's; fp32 on the
device decoding as on the CPU. Exits 1 if a phase failed. `bench/device.sh` runs this on a GPU
machine that has PyTorch but neither fairseq2 nor the server's web packages.

    python bench/gpu.py [--bundle DIR]               # on a GPU
    python bench/gpu.py --device cpu --quick         # the same code, tiny bundle
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

# This tree's packages, also where none is installed (a bare GPU machine): `models`, `server`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, in_worker_thread, print_header, sync, write_json
from decoder_step import Peak, device_peak, free_device_memory, roofline
from engine import Workload, bench_model, bundle_for, make_prompts

from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded, DecodeOptions, SonarCodec

GOAL_ROOFLINE = 3.0  # decoder step time / its bf16 roofline time, at most
GOAL_SPEEDUP = 50.0  # engine sentences/s over the authors' loop, at least
GOAL_CONCURRENCY = 64
# fairseq2 is the reference where installed (this project's lock); a GPU image without it
# still checks the device against the CPU (`cpu_match`).
FAIRSEQ2 = importlib.util.find_spec("fairseq2") is not None
# beam_check compares our beam search with fairseq2's generator, which only the fairseq2 backend
# loads: that backend where fairseq2 is installed (the decoder step is the same code in both),
# the native one where it is not.
BACKEND = "fairseq2" if FAIRSEQ2 else "native"
SCORE_REL = 1e-5  # as tests/models/test_beam_search.py

SENTENCES = [
    "The cat sat on the mat and watched the rain.",
    "Prices rose sharply last year.",
    "We walked to the station together.",
    "The committee will meet again on Monday.",
    "She opened the letter and read it twice.",
    "Rivers carry sand from the mountains to the sea.",
    "The new bridge took four years to build.",
    "He forgot his keys at the office.",
    "Scientists measured the temperature every hour.",
    "The concert ended late.",
    "Our team won the match in the final minute.",
    "The library closes early on Fridays.",
    "End of sequence.",
    "A small boat crossed the lake at dawn.",
    "Nobody knew where the old map had gone.",
    "Bread is cheaper in the morning.",
]


# ----- inputs --------------------------------------------------------------------------------
def check_embeddings(codec: SonarCodec, n: int, seed: int = 0) -> torch.Tensor:
    """n fixed embeddings: `SENTENCES` encoded, then points around them (the random decoder
    ends encoded sentences early and runs noisy points long: both kinds of length)."""
    base = codec.encode(SENTENCES, "eng_Latn").cpu()
    g = torch.Generator().manual_seed(seed)
    rows = [base[i % len(base)] for i in range(n)]
    for i in range(len(base), n):
        rows[i] = rows[i] + 0.3 * base.std() * torch.randn(base.shape[1], generator=g)
    return torch.stack(rows).to(codec.device)


def compare(ours: list[Decoded], theirs: list[Decoded]) -> dict[str, Any]:
    """Our decodes against the reference's, row by row: text and token count, and scores."""
    pairs = list(zip(ours, theirs, strict=True))
    same = [(o.text, o.num_tokens) == (t.text, t.num_tokens) for o, t in pairs]
    close = [math.isclose(o.score, t.score, rel_tol=SCORE_REL, abs_tol=1e-12) for o, t in pairs]
    lengths = [t.num_tokens for t in theirs]
    return {
        "rows": len(pairs),
        "identical_rows": sum(same),
        "differing_rows": len(pairs) - sum(same),
        "max_score_rel_diff": max(
            abs(o.score - t.score) / max(abs(t.score), 1e-12) for o, t in pairs
        ),
        "scores_within_rel": all(close),
        "tokens": sum(lengths),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "examples": [{"ours": o.text, "theirs": t.text} for o, t in pairs if o.text != t.text][:2],
    }


def timed_decode(
    pipe: SonarLLMPipeline, points: torch.Tensor, opts: DecodeOptions, **kw: Any
) -> Any:
    """Seconds `pipe` takes to decode `points` on a worker thread (queued device work
    included), and its decodes."""
    codec = pipe.codec

    def run() -> tuple[float, list[Decoded]]:
        sync(codec.device)
        t0 = time.perf_counter()
        out = list(codec.decode(points.to(codec.device), "eng_Latn", opts, **kw))
        sync(codec.device)
        return time.perf_counter() - t0, out

    return in_worker_thread(run)


# ----- phase: our beam search against fairseq2's ----------------------------------------------
def beam_check(pipe: SonarLLMPipeline, batches: list[int], opts: DecodeOptions) -> dict[str, Any]:
    embs = check_embeddings(pipe.codec, max(batches))
    timed_decode(pipe, embs[:1], opts)  # warm-up (kernels, allocator)
    timed_decode(pipe, embs[:1], opts, use_fairseq2=True)
    rows = []
    for b in batches:
        t_f2, theirs = timed_decode(pipe, embs[:b], opts, use_fairseq2=True)
        t_ours, ours = timed_decode(pipe, embs[:b], opts)
        r = {"batch": b, **compare(ours, theirs), "fairseq2_s": t_f2, "ours_s": t_ours}
        r["passed"] = r["differing_rows"] == 0 and r["scores_within_rel"]
        rows.append(r)
        print(
            f"  batch {b:>3}: {'MATCH' if r['passed'] else 'DIFFER'} (max score rel diff "
            f"{r['max_score_rel_diff']:.1e}; {r['tokens']} tokens, {r['min_tokens']}-"
            f"{r['max_tokens']} a row); fairseq2 {t_f2:.3f} s, ours {t_ours:.3f} s",
            flush=True,
        )
    return {
        "dtype": str(pipe.codec.dtype).removeprefix("torch."),
        "options": asdict(opts),
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
    }


# ----- phase: the device against this machine's CPU, fp32 ------------------------------------
def cpu_match(pipe: SonarLLMPipeline, bundle: Path, rows: int, opts: DecodeOptions) -> Any:
    """The same native code in fp32 on the device and on the CPU: the sentence embeddings' max
    |Δ| (the device's fp32 matmuls may use TF32), and beam search over the same embeddings. On
    a CPU run `pipe` is both sides: every step runs, the verdict is left open."""
    dev = pipe.codec.device
    cpu = pipe
    if dev.type != "cpu":
        cpu = SonarLLMPipeline.load(
            str(bundle), device="cpu", dtype="float32", sonar_backend=BACKEND
        )
    points = check_embeddings(cpu.codec, rows)
    ours_emb = pipe.codec.encode(SENTENCES, "eng_Latn").cpu()
    delta = float((ours_emb - cpu.codec.encode(SENTENCES, "eng_Latn")).abs().max())
    timed_decode(pipe, points[:1], opts)  # warm-up (kernels, allocator)
    t_dev, ours = timed_decode(pipe, points, opts)
    t_cpu, theirs = timed_decode(cpu, points, opts)
    r: dict[str, Any] = {"device": str(dev), "same_device": dev.type == "cpu"}
    r["encoder_max_abs_diff"] = delta
    r |= compare(ours, theirs) | {"device_s": t_dev, "cpu_s": t_cpu}
    r["identical_share"] = r["identical_rows"] / r["rows"]
    r["passed"] = None if r["same_device"] else r["differing_rows"] == 0
    print(
        f"  encoder max |Δ| {delta:.1e}; decoder {r['identical_rows']}/{r['rows']} rows "
        f"identical (max score rel diff {r['max_score_rel_diff']:.1e}; {r['min_tokens']}-"
        f"{r['max_tokens']} tokens a row); {dev} {t_dev:.2f} s, cpu {t_cpu:.2f} s",
        flush=True,
    )
    return r


# ----- goals and the summary -------------------------------------------------------------------
def goal(text: str, value: Any, passed: bool | None, note: str | None = None) -> dict[str, Any]:
    return {"goal": text, "value": value, "passed": passed, **({"note": note} if note else {})}


def goals(data: dict[str, Any], peak: Peak | None) -> list[dict[str, Any]]:
    """The issue's goals, each with its value and PASS (True), FAIL (False) or not evaluated
    (None). The two speed goals are a GPU's at full size: elsewhere they are reported only."""
    full_gpu = data["device"]["type"] == "cuda" and data["settings"]["preset"] == "full"
    speed_note = None if full_gpu else "a goal for a GPU at full size: not evaluated here"
    check, match = data.get("beam_check"), data.get("cpu_match")
    engines = data.get("engine") or {}
    fp32 = engines.get("float32", {}).get("engine") or []
    compared = sum(r["compared"] for r in fp32)
    identical = sum(r["identical"] for r in fp32)
    bf16 = engines.get("bfloat16", {}).get("engine", [])
    at = next((r for r in bf16 if r["concurrency"] == GOAL_CONCURRENCY), None)
    speedup = None if at is None else at["speedup"]
    step = data.get("decoder_step", {}).get("bfloat16")
    largest = max(step["runs"], key=lambda r: r["beams"]) if step and step["runs"] else None
    over = None if largest is None else largest.get("over_roofline")
    return [
        goal(
            "fp32 beam search equals fairseq2's (text, tokens, score rel 1e-5)",
            None if check is None else check["passed"],
            None if check is None else check["passed"],
            None if FAIRSEQ2 else "fairseq2 is not installed: not run",
        ),
        goal(
            "fp32 on the device decodes as on the CPU (text, tokens)",
            None if match is None else match["identical_share"],
            None if match is None else match["passed"],
            "both sides are the CPU here" if match and match["same_device"] else None,
        ),
        goal(
            "fp32 engine outputs identical to the authors' loop",
            identical / compared if compared else None,
            identical == compared if compared else None,
        ),
        goal(
            f"bf16 engine at {GOAL_CONCURRENCY} concurrent >= {GOAL_SPEEDUP:.0f}x the authors' "
            "loop (fp32)",
            speedup,
            None if speedup is None or not full_gpu else speedup >= GOAL_SPEEDUP,
            speed_note,
        ),
        goal(
            f"bf16 decoder step within {GOAL_ROOFLINE:.0f}x of the device's roofline (largest "
            "batch)",
            over,
            None if over is None or not full_gpu else over <= GOAL_ROOFLINE,
            "no peak known for this device: not evaluated" if peak is None else speed_note,
        ),
    ]


def print_summary(data: dict[str, Any]) -> None:
    """The phases' times and the goals' verdicts (each phase printed its own figures)."""
    print("\n# summary")
    print(f"device: {data['device']['name']} (peak: {data['device']['peak_name'] or 'unknown'})")
    print("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in data["phases"].items()))
    for g in data["goals"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[g["passed"]]
        value = g["value"]
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"{verdict}  {g['goal']}: {shown}{'  (' + g['note'] + ')' if 'note' in g else ''}")
    if data["skipped"]:
        print("SKIPPED (over the time budget): " + ", ".join(data["skipped"]))
    for name, err in data["errors"].items():
        print(f"ERROR in {name}: {err.strip().splitlines()[-1]}")


# ----- main ----------------------------------------------------------------------------------
# Settings whose default differs between --quick (tiny bundle) and a full run: (quick, full).
SIZES: dict[str, tuple[Any, Any]] = {
    "per_client": (1, 4),  # prompts per client a round
    "baseline_prompts": (4, 16),  # the authors' loop, at most
    "max_sentences": (2, 4),
    "max_tokens": (16, 48),  # SONAR decoder token cap
    "beam_batches": ("1,4,16", "1,8,64"),  # beam check batch sizes
    "cpu_rows": (8, 16),  # device vs CPU: rows decoded
    "steps": (8, 40),  # decoder steps timed per size
    "warmup": (3, 10),  # decoder steps before those
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny bundle, few prompts and steps")
    ap.add_argument("--bundle", type=Path, default=None, help="use this bundle, build none")
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sonar-bench")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--prompts", type=int, default=None, help="distinct prompts, at most")
    ap.add_argument("--step-beams", default="1,16,64", help="decoder step: beams running")
    ap.add_argument("--budget-s", type=float, default=450.0, help="start no phase after this")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    for name, (quick, full) in SIZES.items():
        flag = "--" + name.replace("_", "-")
        ap.add_argument(flag, type=type(full), help=f"default {full} ({quick} with --quick)")
    args = ap.parse_args(argv)
    for name, (quick, full) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.preset = "tiny" if args.quick else "full"
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for name in ("concurrency", "step_beams", "beam_batches"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",") if x])
    args.prompts = args.prompts or args.per_client * max(args.concurrency)
    return args


class Phases:
    """Runs phases: each timed and printed, its error recorded (the others go on), gpu.json
    written after it; none starts once the run is past its time budget."""

    def __init__(self, data: dict[str, Any], out: Path, budget_s: float, peak: Peak | None):
        self.data, self.out, self.budget_s, self.peak = data, out, budget_s, peak
        self.t_start = time.perf_counter()

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        data = self.data
        elapsed = time.perf_counter() - self.t_start
        if elapsed > self.budget_s:
            print(f"\n## {name}: skipped, {elapsed:.0f} s in (budget {self.budget_s:.0f} s)")
            data["skipped"].append(name)
            write_json(self.out, data)
            return None
        print(f"\n## {name} ({elapsed:.0f} s in)", flush=True)
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception:
            data["errors"][name] = traceback.format_exc()
            traceback.print_exc()
            return None
        finally:
            data["phases"][name] = time.perf_counter() - t0
            print(f"## {name}: {data['phases'][name]:.1f} s", flush=True)
            data["goals"] = goals(data, self.peak)
            write_json(self.out, data)


def run_phases(phase: Phases, args: argparse.Namespace, bundle: Path) -> None:
    """Load every dtype; check fp32; the engine against the authors' fp32 loop; each dtype's
    decoder step."""
    data, peak = phase.data, phase.peak
    decode = DecodeOptions(beam_size=5, max_tokens=args.max_tokens)
    gen = GenerationOptions(max_sentences=args.max_sentences, decode=decode)
    pipes: dict[tuple[str, str], SonarLLMPipeline] = {}
    for dtype in args.dtypes:
        load = functools.partial(
            SonarLLMPipeline.load,
            str(bundle),
            device=args.device,
            dtype=dtype,
            sonar_backend=BACKEND,
        )
        if (pipe := phase(f"load {dtype}", load)) is not None:
            pipes[(dtype, BACKEND)] = pipe
    fp32 = pipes.get(("float32", BACKEND))
    if fp32 is not None:
        if FAIRSEQ2:
            check = functools.partial(beam_check, fp32, args.beam_batches, decode)
            data["beam_check"] = phase("beam_check", check)
        match = functools.partial(cpu_match, fp32, bundle, args.cpu_rows, decode)
        data["cpu_match"] = phase("cpu_match", match)
        prompts = make_prompts(args.prompts)
        work = Workload(prompts, args.concurrency, gen, args.baseline_prompts, args.per_client)
        vs_loop = functools.partial(bench_model, args.preset, pipes, ("float32", BACKEND), work)
        by_side = phase("engine", vs_loop) or {}
        data["engine"] = {dtype: result for (dtype, _), result in by_side.items()}
    for (dtype, _), pipe in pipes.items():

        def step(pipe: SonarLLMPipeline = pipe) -> dict[str, Any]:
            pool = check_embeddings(pipe.codec, 64, seed=1)
            return roofline(pipe, pool, args.step_beams, args.warmup, args.steps, decode, peak)

        data["decoder_step"][dtype] = phase(f"decoder_step {dtype}", step)
        free_device_memory(torch.device(args.device))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dev = torch.device(args.device)
    cuda_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak = device_peak(cuda_name)
    print_header("GPU benchmark: beam-search equality, engine vs the authors' loop, decoder step")
    out = args.out / "gpu.json"
    settings = {k: v for k, v in vars(args).items() if not isinstance(v, Path)}
    data: dict[str, Any] = {
        "benchmark": "gpu",
        "environment": environment(),
        "quick": args.quick,
        "device": {
            "type": dev.type,
            "name": cuda_name or "cpu",
            "peak_name": peak.name if peak else None,
            "peak": asdict(peak) if peak else None,
        },
        "settings": {**settings, "sonar_backend": BACKEND, "fairseq2": FAIRSEQ2},
        **{"phases": {}, "errors": {}, "skipped": [], "engine": {}, "decoder_step": {}},
    }
    phase = Phases(data, out, args.budget_s, peak)
    bundle = phase("bundle", lambda: args.bundle or bundle_for(args.preset, args.cache_dir))
    if bundle is not None:
        data["bundle"] = str(bundle)
        run_phases(phase, args, bundle)
    data["decoder_step"] = {k: v for k, v in data["decoder_step"].items() if v is not None}
    data["wall_seconds"] = time.perf_counter() - phase.t_start
    data["goals"] = goals(data, peak)
    write_json(out, data)
    print_summary(data)
    print(f"\nwrote {out} ({data['wall_seconds']:.0f} s)")
    return 1 if data["errors"] or bundle is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
