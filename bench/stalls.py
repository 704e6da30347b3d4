"""The engine on the tiny bundle: neither a burst of large work nor a sampled request silences
running streams.

1. Burst. Four streams run (sentences without end), first alone, then while a 256-embedding
   `/decode`, a 1,024-text `/embed` and a 2,000-sentence prompt arrive at once: the streams'
   largest and median gap between two sentences in each window, and how long the burst took.
2. A sampled request (temperature 1, top-p 0.9, up to 256 tokens a sentence) beside eight
   beam-search streams, and without it: the same gaps, for this tree's engine and an earlier
   one's (`--baseline-ref`, alternating processes, common.alternate). An engine that decodes a
   sampled sentence whole in its thread stalls every stream for that long.

    .venv/bin/python bench/stalls.py [--quick] [--baseline-ref 37474ac]
    .venv/bin/python bench/stalls.py --only-sampled    (part 2 only)

Writes bench/results/stalls.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, environment, prepared, print_header, results_dir, write_json


def _options(**kw: Any) -> Any:
    from models.generate import GenerationOptions
    from models.sonar_codec import DecodeOptions

    # eos_threshold 1.0: the random model never stops by itself; short sentences.
    defaults: dict[str, Any] = {"max_sentences": 100_000, "eos_threshold": 1.0}
    defaults["decode"] = DecodeOptions(max_tokens=24)
    return GenerationOptions(**(defaults | kw))


# ----- streams, a quiet window, then a loud one ---------------------------------------------
async def _stream(engine: Any, prompt: str, times: list[float], stop: asyncio.Event) -> None:
    from server.engine import GenerationRequest, SentenceEvent

    events = await engine.submit(prepared(engine, GenerationRequest(prompt, _options())))
    try:
        while not stop.is_set():
            event = await events.next(0.5)
            if isinstance(event, SentenceEvent):
                times.append(time.perf_counter())
            elif event is not None:
                return
    finally:
        await events.aclose()


def _gaps(times: list[list[float]], start: float, end: float) -> list[float]:
    """The gaps between sentences of every stream in [start, end]; the silence from the
    window's start to a stream's first sentence counts as a gap too."""
    gaps = []
    for stream in times:
        points = [start, *(t for t in stream if start <= t <= end), end]
        gaps += [b - a for a, b in itertools.pairwise(points)]
    return gaps


async def quiet_then_loud(
    engine: Any, prompts: list[str], window: float, loud: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """Streams for `prompts` run `window` seconds alone, then while `loud()` runs: the largest
    and the median gap between two sentences in each window, and how long `loud()` took."""
    stop = asyncio.Event()
    times: list[list[float]] = [[] for _ in prompts]
    streams = [
        asyncio.ensure_future(_stream(engine, p, t, stop))
        for p, t in zip(prompts, times, strict=True)
    ]
    try:
        while min(len(t) for t in times) < 3:  # every stream is running
            await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await asyncio.sleep(window)
        t1 = time.perf_counter()
        await loud()
        t2 = time.perf_counter()
    finally:
        stop.set()
        ended = await asyncio.gather(*streams, return_exceptions=True)
        engine.stop()
    if errors := [e for e in ended if isinstance(e, BaseException)]:
        raise RuntimeError(f"a stream failed: {errors[0]!r}")
    quiet, noisy = _gaps(times, t0, t1), _gaps(times, t1, t2)
    return {
        "max_gap_without": max(quiet),
        "max_gap_with": max(noisy),
        "median_gap_without": statistics.median(quiet),
        "median_gap_with": statistics.median(noisy),
        "loud_seconds": t2 - t1,
    }


# ----- 1. burst ----------------------------------------------------------------------------
async def burst(pipe: Any, window: float, sizes: tuple[int, int, int]) -> dict[str, Any]:
    import torch

    from server.engine import DecodeRequest, EmbedRequest, Engine, EngineConfig, GenerationRequest

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

    async def loud() -> None:
        jobs = [
            await engine.submit(prepared(engine, DecodeRequest(embeddings, "eng_Latn"))),
            await engine.submit(prepared(engine, EmbedRequest(texts, "eng_Latn"))),
            await engine.submit(
                prepared(engine, GenerationRequest(long_prompt, _options(max_sentences=1)))
            ),
        ]
        finals = await asyncio.gather(*(j.result() for j in jobs))
        if any(f.finish_reason not in ("stop", "length") for f in finals):
            raise RuntimeError(f"a burst request failed: {finals}")

    prompts = ["The cat runs home.", "A small dog sees the moon.", "Why? Because.", "Night."]
    gaps = await quiet_then_loud(engine, prompts, window, loud)
    keys = ("decode_embeddings", "embed_texts", "prompt_sentences")
    return dict(zip(keys, sizes, strict=True)) | gaps


# ----- 2. a sampled request beside beam searches ----------------------------------------------
async def _sampled(bundle: str, seconds: float) -> dict[str, float]:
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions
    from server.engine import Engine, EngineConfig, GenerationRequest

    pipe = SonarLLMPipeline.load(bundle, device="cpu")
    engine = Engine(pipe, EngineConfig(max_running=16, max_waiting=16))
    engine.start()
    decode = DecodeOptions(max_tokens=256, temperature=1.0, top_p=0.9)
    request = GenerationRequest("A sampled story begins.", _options(seed=1, decode=decode))

    async def loud() -> None:
        sampled = await engine.submit(prepared(engine, request))
        try:
            await asyncio.sleep(seconds)
        finally:
            await sampled.aclose()

    prompts = [f"Stream {i} tells a story. It goes on." for i in range(8)]
    return await quiet_then_loud(engine, prompts, seconds, loud)


def gap_line(g: dict[str, float]) -> str:
    return (
        f"largest gap {g['max_gap_with']:.3f} s with it vs {g['max_gap_without']:.3f} s without "
        f"({g['max_gap_with'] / g['max_gap_without']:.2f}×; median {g['median_gap_with']:.3f} vs "
        f"{g['median_gap_without']:.3f} s)"
    )


def sampled_gaps(bundle: str, ref: str, seconds: float, rounds: int) -> dict[str, Any]:
    """`_sampled` on `ref`'s engine ("before") and this tree's ("after"), alternating processes
    `rounds` times: each run's figures, and their medians."""
    by_tree = alternate(__file__, [bundle, seconds], [ref], rounds)
    out = {"before": by_tree[ref], "after": by_tree["this tree"]}
    for side, med in out.items():
        tree = ref if side == "before" else "this tree"
        print(f"  {side:6s} ({tree}), 8 beam streams: {gap_line(med)}", flush=True)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(asyncio.run(_sampled(sys.argv[2], float(sys.argv[3])))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small burst, short windows")
    parser.add_argument("--baseline-ref", default="37474ac", help="the engine to compare with")
    parser.add_argument("--only-sampled", action="store_true", help="only part 2")
    args = parser.parse_args()
    print_header("engine: burst stalls and a sampled request beside beam searches (tiny bundle)")

    from models import tiny
    from models.pipeline import SonarLLMPipeline

    bundle_dir = tiny.build(Path(tempfile.mkdtemp(prefix="stalls-bundle-"))).root
    result: dict[str, Any] = {"environment": environment(), "baseline_ref": args.baseline_ref}
    if not args.only_sampled:
        pipe = SonarLLMPipeline.load(bundle_dir, device="cpu")
        sizes = (32, 128, 200) if args.quick else (256, 1024, 2000)
        result["burst"] = b = asyncio.run(burst(pipe, 2.0 if args.quick else 6.0, sizes))
        print(
            f"burst ({sizes[0]}-embedding /decode + {sizes[1]}-text /embed + {sizes[2]}-sentence "
            f"prompt) took {b['loud_seconds']:.1f} s; 4 streams: {gap_line(b)}",
            flush=True,
        )
        write_json(
            results_dir(args.quick) / "stalls.json", result
        )  # a run cut short keeps what it measured
    seconds, rounds = (3.0, 1) if args.quick else (6.0, 3)
    print(f"a sampled request beside 8 beam-search streams (median of {rounds} runs):")
    result["sampled"] = sampled_gaps(str(bundle_dir), args.baseline_ref, seconds, rounds)
    write_json(results_dir(args.quick) / "stalls.json", result)


if __name__ == "__main__":
    main()
