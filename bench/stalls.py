"""Engine v2 on the tiny bundle: a burst of large work does not silence running streams, and what
one iteration costs with 16 and 64 requests running, against an earlier engine.

1. Burst. Four streaming requests run (sentences without end). In the first window nothing else
   happens; in the second, a 256-embedding `/decode`, a 1,024-text `/embed` and a
   2,000-sentence prompt arrive at once. Reported: the largest and the median gap between two
   sentences of the four streams in each window, and how long the burst took to finish. The
   engine spreads the burst over iterations (decode rows join the decoder batch, texts are
   encoded in bounded chunks, the prompt is prefilled in chunks), so the streams keep going.
2. A sampled request beside beam searches. Eight streams decode with beam search; in the first
   window nothing else happens, in the second a request that samples its sentences (temperature
   1, top-p 0.9, up to 256 tokens a sentence) runs beside them. Reported: the eight streams'
   largest and median gap between two sentences in each window, against an earlier engine
   (`--sampled-ref`), both measured in one run as below. An engine that decodes a sampled
   sentence whole in its thread stalls every stream for that long; one that samples inside the
   batched decoder step does not.
3. Iteration overhead. N requests (16, 64) generate without end; after all are admitted, the
   wall time per engine iteration (one decoder token for every running sentence, plus any
   completions) is measured over a few seconds. The same worker runs against this tree and
   against a git commit (`--baseline-ref`, checked out in a temporary worktree) in separate
   processes, alternately, so both are measured in one run on the same machine.

    .venv/bin/python bench/stalls.py [--quick] [--baseline-ref 58b9202] [--sampled-ref 37474ac]
    .venv/bin/python bench/stalls.py --only-sampled    (part 2 only)

Writes bench/results/stalls.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from common import REPO_ROOT, RESULTS_DIR, environment, print_header, run_worker, write_json


def _options(**kw: Any) -> Any:
    from models.generate import GenerationOptions
    from models.sonar_codec import DecodeOptions

    # eos_threshold 1.0: the random model never stops by itself; short sentences.
    values: dict[str, Any] = {
        "max_sentences": 100_000,
        "eos_threshold": 1.0,
        "decode": DecodeOptions(max_tokens=24),
        **kw,
    }
    return GenerationOptions(**values)


# ----- 1. burst ----------------------------------------------------------------------------
async def _stream(engine: Any, prompt: str, times: list[float], stop: asyncio.Event) -> None:
    from server.engine import GenerationRequest, SentenceEvent

    events = await engine.submit(GenerationRequest(prompt, _options()))
    try:
        while not stop.is_set():
            event = await events.next(0.5)
            if isinstance(event, SentenceEvent):
                times.append(time.perf_counter())
            elif event is not None:
                return
    finally:
        await events.aclose()


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in times if start <= t <= end]
    # The silence from the window's start to the first sentence counts as a gap too.
    points = [start, *inside, end]
    return [b - a for a, b in itertools.pairwise(points)]


async def burst(pipe: Any, window: float, sizes: tuple[int, int, int]) -> dict[str, Any]:
    import torch

    from server.engine import (
        DecodeRequest,
        EmbedRequest,
        Engine,
        EngineConfig,
        GenerationRequest,
    )

    n_decode, n_embed, n_prompt = sizes
    # The burst's inputs are made before anything runs (the codec is the engine's afterwards).
    texts = [f"Text number {i} of the burst, with a few more words." for i in range(n_embed)]
    vectors = pipe.codec.encode(texts[:64], "eng_Latn").cpu()
    embeddings = vectors.repeat(-(-n_decode // 64), 1)[:n_decode] + 0.01 * torch.randn(
        n_decode, vectors.shape[1], generator=torch.Generator().manual_seed(0)
    )
    long_prompt = " ".join(f"Sentence {i} of a very long prompt." for i in range(n_prompt))
    engine = Engine(pipe, EngineConfig(max_running=32))
    engine.start()
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(4)]
    prompts = ["The cat runs home.", "A small dog sees the moon.", "Why? Because.", "Night."]
    streams = [
        asyncio.ensure_future(_stream(engine, p, t, stop))
        for p, t in zip(prompts, times, strict=True)
    ]
    try:
        while min(len(t) for t in times) < 3:  # all four are running
            await asyncio.sleep(0.05)
        quiet_start = time.perf_counter()
        await asyncio.sleep(window)
        quiet_end = burst_start = time.perf_counter()
        jobs = [
            await engine.submit(DecodeRequest(embeddings, "eng_Latn")),
            await engine.submit(EmbedRequest(texts, "eng_Latn")),
            await engine.submit(GenerationRequest(long_prompt, _options(max_sentences=1))),
        ]
        finals = await asyncio.gather(*(j.result() for j in jobs))
        burst_end = time.perf_counter()
        assert all(f.finish_reason in ("stop", "length") for f in finals), finals
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
        engine.stop()
    quiet = [g for t in times for g in _gaps(t, quiet_start, quiet_end)]
    loud = [g for t in times for g in _gaps(t, burst_start, burst_end)]
    return {
        "sizes": {
            "decode_embeddings": n_decode,
            "embed_texts": n_embed,
            "prompt_sentences": n_prompt,
        },
        "burst_seconds": burst_end - burst_start,
        "without_burst": {"max_gap": max(quiet), "median_gap": statistics.median(quiet)},
        "with_burst": {"max_gap": max(loud), "median_gap": statistics.median(loud)},
    }


# ----- 2. a sampled request beside beam searches ----------------------------------------------
async def _sampled(bundle: str, seconds: float) -> dict[str, float]:
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions
    from server.engine import Engine, EngineConfig, GenerationRequest

    pipe = SonarLLMPipeline.load(bundle, device="cpu")
    engine = Engine(pipe, EngineConfig(max_running=16, max_waiting=16))
    engine.start()
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in range(8)]
    prompts = [f"Stream {i} tells a story. It goes on." for i in range(8)]
    streams = [
        asyncio.ensure_future(_stream(engine, p, t, stop))
        for p, t in zip(prompts, times, strict=True)
    ]
    sampled_opts = _options(
        seed=1, decode=DecodeOptions(max_tokens=256, temperature=1.0, top_p=0.9)
    )
    sampled = None
    try:
        while min(len(t) for t in times) < 3:  # all eight are running
            await asyncio.sleep(0.05)
        quiet_start = time.perf_counter()
        await asyncio.sleep(seconds)
        quiet_end = loud_start = time.perf_counter()
        sampled = await engine.submit(GenerationRequest("A sampled story begins.", sampled_opts))
        await asyncio.sleep(seconds)
        loud_end = time.perf_counter()
    finally:
        stop.set()
        if sampled is not None:
            await sampled.aclose()
        await asyncio.gather(*streams, return_exceptions=True)
        engine.stop()
    quiet = [g for t in times for g in _gaps(t, quiet_start, quiet_end)]
    loud = [g for t in times for g in _gaps(t, loud_start, loud_end)]
    return {
        "max_gap_without": max(quiet),
        "max_gap_with": max(loud),
        "median_gap_without": statistics.median(quiet),
        "median_gap_with": statistics.median(loud),
    }


def sampled_gaps(bundle: str, ref: str, seconds: float, rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with _worktree(ref) as tmp:
        for _ in range(rounds):  # alternate: drifts in machine load hit both sides
            runs["before"].append(run_worker(__file__, ["sampled", bundle, 0, seconds], tmp))
            runs["after"].append(run_worker(__file__, ["sampled", bundle, 0, seconds], REPO_ROOT))
    out: dict[str, Any] = {"ref": ref, "runs": runs}
    for side, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        out[side] = med
        print(
            f"  {side:6s} ({ref if side == 'before' else 'this tree'}): largest gap of 8 beam "
            f"streams {med['max_gap_with']:.3f} s beside a sampled request vs "
            f"{med['max_gap_without']:.3f} s without "
            f"({med['max_gap_with'] / med['max_gap_without']:.2f}×; median "
            f"{med['median_gap_with']:.3f} vs {med['median_gap_without']:.3f} s)",
            flush=True,
        )
    return out


@contextlib.contextmanager
def _worktree(ref: str) -> Iterator[Path]:
    """`ref` checked out in a temporary worktree (removed afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="stalls-baseline-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tmp), ref],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield tmp
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(tmp)],
            cwd=REPO_ROOT,
            check=False,
            capture_output=True,
        )


# ----- 3. iteration overhead ---------------------------------------------------------------
async def _overhead(bundle: str, running: int, seconds: float) -> dict[str, float]:
    from models.pipeline import SonarLLMPipeline
    from server.engine import Engine, EngineConfig, GenerationRequest

    pipe = SonarLLMPipeline.load(bundle, device="cpu")
    engine = Engine(pipe, EngineConfig(max_running=running, max_waiting=running))
    engine.start()
    prompts = [f"Request {i} starts here. It goes on." for i in range(running)]
    streams = [await engine.submit(GenerationRequest(p, _options())) for p in prompts]
    try:
        while engine.num_running < running or engine.num_waiting:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # every prompt prefilled, sentences under way
        t0, i0 = time.perf_counter(), engine.iterations
        await asyncio.sleep(seconds)
        t1, i1 = time.perf_counter(), engine.iterations
    finally:
        for s in streams:
            await s.aclose()
        engine.stop()
    return {"ms_per_iteration": 1000 * (t1 - t0) / max(1, i1 - i0), "iterations": i1 - i0}


def _run_worker(root: Path, bundle: str, running: int, seconds: float) -> dict[str, float]:
    return run_worker(__file__, ["overhead", bundle, running, seconds], root)


def overhead(bundle: str, ref: str, counts: list[int], seconds: float, rounds: int) -> dict:
    results: dict[str, Any] = {}
    with _worktree(ref) as tmp:
        for n in counts:
            runs: dict[str, list[float]] = {"before": [], "after": []}
            for _ in range(rounds):  # alternate: drifts in machine load hit both sides
                runs["before"].append(_run_worker(tmp, bundle, n, seconds)["ms_per_iteration"])
                runs["after"].append(_run_worker(REPO_ROOT, bundle, n, seconds)["ms_per_iteration"])
            before, after = statistics.median(runs["before"]), statistics.median(runs["after"])
            results[str(n)] = {
                "before_ms": before,
                "after_ms": after,
                "runs": runs,
                "after_over_before": after / before,
            }
            print(
                f"  {n:3d} running: {before:7.2f} ms/iteration before ({ref}), "
                f"{after:7.2f} after ({after / before:.2f}×)",
                flush=True,
            )
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, bundle, running, seconds = sys.argv[2:6]
        if mode == "sampled":
            print(json.dumps(asyncio.run(_sampled(bundle, float(seconds)))))
        else:
            print(json.dumps(asyncio.run(_overhead(bundle, int(running), float(seconds)))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small burst, short windows")
    parser.add_argument("--baseline-ref", default="58b9202", help="the engine to compare with")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead part")
    parser.add_argument("--sampled-ref", default="37474ac", help="the engine part 2 compares with")
    parser.add_argument("--only-sampled", action="store_true", help="only part 2")
    args = parser.parse_args()
    print_header("engine v2: burst stalls and iteration overhead (tiny bundle)")

    from models import tiny
    from models.pipeline import SonarLLMPipeline

    bundle_dir = Path(tempfile.mkdtemp(prefix="stalls-bundle-"))
    tiny.build(bundle_dir)
    if args.only_sampled:
        seconds, rounds = (3.0, 1) if args.quick else (6.0, 3)
        print(f"a sampled request beside 8 beam-search streams (median of {rounds} runs):")
        sampled = sampled_gaps(str(bundle_dir), args.sampled_ref, seconds, rounds)
        write_json(RESULTS_DIR / "stalls_sampled.json", {"environment": environment(), **sampled})
        return
    pipe = SonarLLMPipeline.load(bundle_dir, device="cpu")
    sizes = (32, 128, 200) if args.quick else (256, 1024, 2000)
    window = 2.0 if args.quick else 6.0
    b = asyncio.run(burst(pipe, window, sizes))
    print(
        f"burst ({sizes[0]}-embedding /decode + {sizes[1]}-text /embed + {sizes[2]}-sentence "
        f"prompt) took {b['burst_seconds']:.1f} s; largest gap of 4 streams: "
        f"{b['with_burst']['max_gap']:.3f} s with it vs {b['without_burst']['max_gap']:.3f} s "
        f"without (median {b['with_burst']['median_gap']:.3f} vs "
        f"{b['without_burst']['median_gap']:.3f} s)",
        flush=True,
    )
    result: dict[str, Any] = {"environment": environment(), "burst": b}
    seconds, rounds = (3.0, 1) if args.quick else (6.0, 3)
    print(f"a sampled request beside 8 beam-search streams (median of {rounds} runs):")
    result["sampled"] = sampled_gaps(str(bundle_dir), args.sampled_ref, seconds, rounds)
    if not args.no_overhead:
        counts = [16, 64]
        seconds, rounds = (2.0, 1) if args.quick else (4.0, 3)
        print(f"iteration overhead (median of {rounds} alternating runs of {seconds:.0f} s):")
        result["overhead"] = overhead(str(bundle_dir), args.baseline_ref, counts, seconds, rounds)
        result["baseline_ref"] = args.baseline_ref
    write_json(RESULTS_DIR / "stalls.json", result)


if __name__ == "__main__":
    main()
