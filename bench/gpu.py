"""One command that measures a GPU: the full-size bundle, checked and timed, in a few minutes.

Phases, each timed and printed, gpu.json written after each; none starts after `--budget-s`
seconds: `bundle` (the full-size random-weight bundle, built once in `--cache-dir`, or `--bundle
DIR`); `cpu_match` (fp32: the same code on the device and on this machine's CPU); `engine`
(bench/engine.py's comparison with the authors' fp32 loop, in each dtype); `decoder_step`
(bench/decoder_step.py's `roofline`: time per step against the device's roofline).

Goals (the issue's): the bf16 decoder step within 3x of the device's roofline; the bf16 engine at
64 clients at least 50x the authors' loop; fp32 on the device decoding as on the CPU (that our
beam search gives fairseq2's is a test: tests/models/test_beam_search.py). Exits 1 if a phase
failed. `bench/device.sh` runs this on a GPU machine that has PyTorch but not fairseq2.

    python bench/gpu.py [--bundle DIR]               # on a GPU
    python bench/gpu.py --device cpu --quick         # the same code, tiny bundle
"""

from __future__ import annotations

import argparse
import functools
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
from common import environment, in_worker_thread, print_header, results_dir, sync, write_json
from decoder_step import (
    SENTENCES,
    Peak,
    check_embeddings,
    device_peak,
    free_device_memory,
    roofline,
)
from engine import Workload, bench_model, bundle_for, make_prompts

from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DEFAULT_BACKEND, Decoded, DecodeOptions

GOAL_ROOFLINE = 3.0  # decoder step time / its bf16 roofline time, at most
GOAL_SPEEDUP = 50.0  # engine sentences/s over the authors' loop, at least
GOAL_CONCURRENCY = 64
BACKEND = DEFAULT_BACKEND  # native: the decoder step is the same code on both SONAR backends


def timed_decode(pipe: SonarLLMPipeline, points: torch.Tensor, opts: DecodeOptions) -> Any:
    """Seconds `pipe` takes to decode `points` on a worker thread (queued device work
    included), and its decodes."""
    codec = pipe.codec

    def run() -> tuple[float, list[Decoded]]:
        sync(codec.device)
        t0 = time.perf_counter()
        out = list(codec.decode(points.to(codec.device), "eng_Latn", opts))
        sync(codec.device)
        return time.perf_counter() - t0, out

    return in_worker_thread(run)


# ----- phase: the device against this machine's CPU, fp32 ------------------------------------
def cpu_match(pipe: SonarLLMPipeline, bundle: Path, rows: int, opts: DecodeOptions) -> Any:
    """The same native code in fp32 on the device and on the CPU: the sentence embeddings' max
    |Δ| (the device's fp32 matmuls may use TF32), and beam search over the same embeddings: text
    and token count per row, the largest relative score difference. On a CPU run `pipe` is both
    sides: every step runs, the verdict is left open."""
    dev = pipe.codec.device
    cpu = pipe
    if dev.type != "cpu":
        cpu = SonarLLMPipeline.load(str(bundle), device="cpu", dtype="float32")
    points = check_embeddings(cpu.codec, rows)
    ours_emb = pipe.codec.encode(SENTENCES, "eng_Latn").cpu()
    delta = float((ours_emb - cpu.codec.encode(SENTENCES, "eng_Latn")).abs().max())
    timed_decode(pipe, points[:1], opts)  # warm-up (kernels, allocator)
    t_dev, ours = timed_decode(pipe, points, opts)
    t_cpu, theirs = timed_decode(cpu, points, opts)
    pairs = list(zip(ours, theirs, strict=True))
    same = sum((o.text, o.num_tokens) == (t.text, t.num_tokens) for o, t in pairs)
    rel = max(abs(o.score - t.score) / max(abs(t.score), 1e-12) for o, t in pairs)
    lengths = [t.num_tokens for t in theirs]
    print(
        f"  encoder max |Δ| {delta:.1e}; decoder {same}/{len(pairs)} rows identical (max score "
        f"rel diff {rel:.1e}; {min(lengths)}-{max(lengths)} tokens a row); {dev} {t_dev:.2f} s, "
        f"cpu {t_cpu:.2f} s",
        flush=True,
    )
    return {
        "device": str(dev),
        "same_device": dev.type == "cpu",
        "encoder_max_abs_diff": delta,
        "rows": len(pairs),
        "identical_rows": same,
        "identical_share": same / len(pairs),
        "max_score_rel_diff": rel,
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "device_s": t_dev,
        "cpu_s": t_cpu,
        "examples": [{"device": o.text, "cpu": t.text} for o, t in pairs if o.text != t.text][:2],
        "passed": None if dev.type == "cpu" else same == len(pairs),
    }


# ----- goals and the summary -------------------------------------------------------------------
def goals(data: dict[str, Any], peak: Peak | None) -> list[dict[str, Any]]:
    """The issue's goals, each with its value and PASS (True), FAIL (False) or not evaluated
    (None). The two speed goals are a GPU's at full size: elsewhere they are reported only."""
    full_gpu = data["device"]["type"] == "cuda" and data["settings"]["preset"] == "full"
    speed_note = None if full_gpu else "a goal for a GPU at full size: not evaluated here"
    match = data.get("cpu_match") or {}
    engines = data.get("engine") or {}
    fp32 = engines.get("float32", {}).get("engine") or []
    compared = sum(r["compared"] for r in fp32)
    identical = sum(r["identical"] for r in fp32)
    bf16 = engines.get("bfloat16", {}).get("engine", [])
    at: dict[str, Any] = next((r for r in bf16 if r["concurrency"] == GOAL_CONCURRENCY), {})
    step = (data.get("decoder_step", {}).get("bfloat16") or {}).get("runs")
    over = max(step, key=lambda r: r["beams"]).get("over_roofline") if step else None
    rows = [
        (
            "fp32 on the device decodes as on the CPU (text, tokens)",
            match.get("identical_share"),
            match.get("passed"),
            "both sides are the CPU here" if match.get("same_device") else None,
        ),
        (
            "fp32 engine outputs identical to the authors' loop",
            identical / compared if compared else None,
            identical == compared if compared else None,
            None,
        ),
        (
            f"bf16 engine at {GOAL_CONCURRENCY} clients >= {GOAL_SPEEDUP:.0f}x the authors' loop",
            at.get("speedup"),
            None if not at or not full_gpu else at["speedup"] >= GOAL_SPEEDUP,
            speed_note,
        ),
        (
            f"bf16 decoder step within {GOAL_ROOFLINE:.0f}x of the device's roofline (most beams)",
            over,
            None if over is None or not full_gpu else over <= GOAL_ROOFLINE,
            "no peak known for this device: not evaluated" if peak is None else speed_note,
        ),
    ]
    return [
        {"goal": text, "value": value, "passed": passed, **({"note": note} if note else {})}
        for text, value, passed, note in rows
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
    ap.add_argument("--out", type=Path, help="folder for gpu.json (default: bench/results)")
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
    for name in ("concurrency", "step_beams"):
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
            SonarLLMPipeline.load, str(bundle), device=args.device, dtype=dtype
        )
        if (pipe := phase(f"load {dtype}", load)) is not None:
            pipes[(dtype, BACKEND)] = pipe
    fp32 = pipes.get(("float32", BACKEND))
    if fp32 is not None:
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
    print_header("GPU benchmark: device vs CPU, engine vs the authors' loop, decoder step")
    out = (args.out or results_dir(args.quick)) / "gpu.json"
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
        "settings": {**settings, "sonar_backend": BACKEND},
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
