"""HTTP + SSE overhead: the same streaming workload through the engine in-process and over HTTP.

Goal (issue): the HTTP+SSE path within 10% of the engine driven in-process (`Engine.submit()`
in this process) and `sonar-llm serve` in a subprocess (`POST /generate`, `stream: true`, read
with httpx-sse): the same bundle, engine limits, prompts and options (`eos_threshold` 1.0, so
every request makes `--max-sentences`), `--concurrency` closed-loop clients, rounds alternating
the order. The verdict: the larger of the throughput lost and the p50 end-to-end latency added,
from the medians of the per-round ratios.

    .venv/bin/python bench/serve.py [--quick] [--bundle DIR] [--concurrency 8] [--rounds 12]

Writes bench/results/serve.json (quick/serve.json with --quick); exits 1 if a request failed
or the goal is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from httpx_sse import aconnect_sse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, loadavg, percentile, print_header, results_dir, write_json

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.engine import Engine, EngineConfig, FinalEvent, GenerationRequest, SentenceEvent
from server.testing import ServerProcess

GOAL_OVERHEAD = 0.10
MODES = ("in-process", "http")
WORDS = "the cat dog sun moon river city night music garden train story runs sleeps".split()


@dataclass
class Trace:
    """One request's timeline (perf_counter seconds) and sentences."""

    t0: float
    sentences: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    end: float | None = None
    error: str | None = None


Client = Callable[[int], Awaitable[Trace]]


def in_process_client(engine: Engine, prompts: list[str], opts: GenerationOptions) -> Client:
    async def one(i: int) -> Trace:
        tr = Trace(time.perf_counter())
        async for event in await engine.submit(engine.prepare(GenerationRequest(prompts[i], opts))):
            if isinstance(event, SentenceEvent):
                tr.sentences.append(time.perf_counter())
                tr.texts.append(event.text)
            elif isinstance(event, FinalEvent):
                tr.end = time.perf_counter()
                if event.finish_reason not in ("stop", "length"):
                    tr.error = f"{event.finish_reason}: {event.error}"
        return tr

    return one


def http_client(client: httpx.AsyncClient, prompts: list[str], body: dict[str, Any]) -> Client:
    async def one(i: int) -> Trace:
        tr = Trace(time.perf_counter())
        async with aconnect_sse(
            client, "POST", "/generate", json={"prompt": prompts[i], **body}
        ) as source:
            if (r := source.response).status_code != 200:
                tr.error = f"HTTP {r.status_code}: {(await r.aread())!r}"
                return tr
            async for sse in source.aiter_sse():
                if sse.event == "sentence":
                    tr.sentences.append(time.perf_counter())
                    tr.texts.append(json.loads(sse.data)["text"])
                else:
                    tr.end = time.perf_counter()
                    tr.error = None if sse.event == "done" else sse.data
        if tr.end is None and tr.error is None:
            tr.error = "stream ended without a done event"
        return tr

    return one


async def drive(one: Client, n: int, concurrency: int) -> dict[str, Any]:
    """Requests 0..n-1 from `concurrency` closed-loop clients: their traces and summary."""
    traces: dict[int, Trace] = {}
    todo = iter(range(n))
    start = time.perf_counter()

    async def worker() -> None:
        for i in todo:  # a shared iterator: each client takes the next request
            traces[i] = await one(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    ends = {i: t.end for i, t in traces.items() if t.error is None and t.end is not None}
    ok = [traces[i] for i in ends]
    wall = max(ends.values(), default=start) - start
    e2e = [end - traces[i].t0 for i, end in ends.items()]
    ttfs = [t.sentences[0] - t.t0 for t in ok if t.sentences]
    sentences = sum(len(t.texts) for t in ok)
    return {
        "failed": n - len(ok),
        "errors": sorted({t.error for t in traces.values() if t.error})[:5],
        "sentences_per_s": sentences / wall if wall > 0 else None,
        "ttfs_p50": percentile(ttfs, 50),
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "texts": {i: t.texts for i, t in traces.items() if t.error is None},
    }


def overhead(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the per-round HTTP / in-process ratios, and a bootstrap interval over rounds."""
    pairs = [
        (r["http"]["sentences_per_s"] / r["in-process"]["sentences_per_s"],
         r["http"]["e2e_p50"] / r["in-process"]["e2e_p50"])
        for r in rounds
    ]  # fmt: skip

    def worst(picked: list[tuple[float, float]]) -> float:
        sps = statistics.median(p[0] for p in picked)
        return max(1 - sps, statistics.median(p[1] for p in picked) - 1)

    rng = random.Random(0)
    boot = [worst([rng.choice(pairs) for _ in pairs]) for _ in range(2000 if len(pairs) > 1 else 0)]
    return {
        "per_round_sentences_per_s_ratio": [p[0] for p in pairs],
        "per_round_e2e_p50_ratio": [p[1] for p in pairs],
        "overhead": worst(pairs),  # max(throughput lost, p50 latency added), a fraction
        "overhead_95ci": [percentile(boot, 2.5), percentile(boot, 97.5)] if boot else None,
        "goal": GOAL_OVERHEAD,
    }


async def run(args: argparse.Namespace, bundle: Path, server: ServerProcess) -> list[dict]:
    rng = random.Random(0)
    prompts = [
        " ".join(" ".join(rng.choices(WORDS, k=6)).capitalize() + "." for _ in range(1 + i % 4))
        for i in range(args.requests)
    ]
    body = {"max_sentences": args.max_sentences, "max_tokens": args.max_tokens, "stream": True}
    body |= {"beam_size": args.beam_size, "eos_threshold": 1.0}
    decode = DecodeOptions(beam_size=args.beam_size, max_tokens=args.max_tokens)
    opts = GenerationOptions(max_sentences=args.max_sentences, eos_threshold=1.0, decode=decode)
    # Load the in-process side while the server loads: both are ready before round 1.
    pipe = await asyncio.to_thread(SonarLLMPipeline.load, bundle, device=args.device)
    print(f"# server ready in {await asyncio.to_thread(server.wait_ready, 300):.1f} s")
    engine = Engine(pipe, EngineConfig(max_running=args.max_running, max_waiting=args.requests))
    engine.start()
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    rounds: list[dict] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            clients = {
                "in-process": in_process_client(engine, prompts, opts),
                "http": http_client(client, prompts, body),
            }
            for mode in MODES:  # warm-up: lazy initialisation, caches, the connection pool
                await drive(clients[mode], args.concurrency, args.concurrency)
            for r in range(args.rounds):
                entry: dict[str, Any] = {"round": r, "loadavg": loadavg()}
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    entry[mode] = await drive(clients[mode], args.requests, args.concurrency)
                    s = entry[mode]
                    print(
                        f"  round {r} {mode:>10}: {s['sentences_per_s'] or 0:7.2f} sentences/s, "
                        f"TTFS p50 {1e3 * (s['ttfs_p50'] or 0):.1f} ms, E2E p50 "
                        f"{1e3 * (s['e2e_p50'] or 0):.1f} ms"
                        f", failed {s['failed']} (load {entry['loadavg'][:1]})",
                        flush=True,
                    )
                rounds.append(entry)
    finally:
        engine.stop()
    return rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run (~1 min), quick/serve.json")
    p.add_argument("--bundle", type=Path, help="a built bundle (default: build the tiny one)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--requests", type=int, help="requests per round and side (default 64)")
    p.add_argument("--rounds", type=int, help="A/B rounds (default 12)")
    p.add_argument("--max-sentences", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-running", type=int, default=32, help="engine batch limit, both sides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, help="torch threads, both sides")
    args = p.parse_args()
    args.requests = args.requests or (16 if args.quick else 64)
    args.rounds = args.rounds or (4 if args.quick else 12)
    print_header("serving overhead: Engine in-process vs HTTP + SSE (same workload, A/B rounds)")
    env = {}
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        env = {"OMP_NUM_THREADS": str(args.torch_threads)}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        bundle = args.bundle or tiny.build(Path(tmp) / "bundle").root
        argv = ["--model", str(bundle), "--device", args.device, "--log-level", "warning"]
        argv += ["--max-running", str(args.max_running), "--max-waiting", str(args.requests)]
        argv += ["--max-sentences-limit", str(max(args.max_sentences, 8))]
        with ServerProcess(argv, Path(tmp) / "server.log", env=env) as server:
            rounds = asyncio.run(run(args, bundle, server))
            server.stop()
    failed = sum(r[m]["failed"] for r in rounds for m in MODES)
    same = [
        rounds[0]["in-process"]["texts"].get(i) == t for i, t in rounds[0]["http"]["texts"].items()
    ]
    ratios = overhead(rounds) if not failed else {}
    passed = not failed and ratios["overhead"] < GOAL_OVERHEAD
    ci, worst = ratios.get("overhead_95ci"), ratios.get("overhead", float("nan"))
    print(
        f"{'PASS' if passed else 'FAIL'}: HTTP+SSE overhead {worst:.1%}"
        f" (goal < {GOAL_OVERHEAD:.0%}; 95% interval over rounds "
        f"{'-' if ci is None else f'{ci[0]:.1%} .. {ci[1]:.1%}'}); {failed} requests failed; "
        f"outputs identical across paths (round 0): {sum(same)}/{len(same)}"
    )
    for r in rounds:
        for m in MODES:
            r[m].pop("texts")
    config = vars(args) | {"bundle": str(args.bundle)}
    result: dict[str, Any] = {"environment": environment(), "config": config, "overhead": ratios}
    result |= {"identical": [sum(same), len(same)], "rounds": rounds}
    write_json(results_dir(args.quick) / "serve.json", result)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
