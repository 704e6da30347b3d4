"""Soak: `sonar-llm serve` under minutes of streaming load, for its memory figure.

Starts the server (tiny bundle, small limits, on loopback) and runs closed-loop clients on
/generate and /v1/chat/completions (JSON and streams, a fifth of the streams closed by the
client mid-way) for `--duration` seconds, sampling the server's resident memory. Reports the
resident memory's growth per 1000 requests after the warm-up (a least-squares fit), the 5xx
count, whether running/waiting/reserved/cached bytes went back to 0, and SIGTERM's exit code.
Exits 1 if there was a 5xx, a gauge stayed above 0 or the exit was not clean. What each answer
holds, cancellation accounting and bursts are tests/server/test_soak.py's.

    .venv/bin/python bench/soak.py [--duration 240] [--clients 16]

Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, metrics, print_header, write_json

from server.testing import ServerProcess

ARGS = ["--device", "cpu", "--max-running", "8", "--max-waiting", "8", "--log-level", "warning"]
IDLE = ("num_requests_running", "num_requests_waiting", "cache_reserved_bytes", "decoder_rows")
WORDS = "the cat dog sun moon river city night music garden train story runs sleeps sings".split()


async def client_loop(
    client: httpx.AsyncClient, rng: random.Random, until: float, counts: dict[str, int]
) -> None:
    """One closed-loop client until `until`, counting outcomes (status or "disconnected")."""
    while time.monotonic() < until:
        prompt = " ".join(" ".join(rng.choices(WORDS, k=5)) + "." for _ in range(2))
        stream, chat = rng.random() < 0.7, rng.random() < 0.5
        opts = {"max_tokens": 32, "max_sentences": rng.randint(1, 6), "stream": stream}
        body = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        route = "/v1/chat/completions" if chat else "/generate"
        leave = rng.randint(1, 6) if stream and rng.random() < 0.2 else None
        async with client.stream("POST", route, json={**body, **opts}) as r:
            lines = 0
            async for line in r.aiter_lines():
                lines += line.startswith("data:")
                if leave is not None and lines >= leave:
                    break  # the client leaves mid-stream
        key = f"{r.status_code}" if leave is None else "disconnected"
        counts[key] = counts.get(key, 0) + 1


async def load(server: ServerProcess, clients: int, duration: float) -> dict[str, Any]:
    ps = psutil.Process(server.pid)
    rss: list[tuple[int, float]] = []  # (requests done, MB)
    counts: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
        until = time.monotonic() + duration
        rngs = [random.Random(i) for i in range(clients)]
        tasks = [asyncio.ensure_future(client_loop(client, r, until, counts)) for r in rngs]
        while not all(t.done() for t in tasks):
            rss.append((sum(counts.values()), ps.memory_info().rss / 2**20))
            await asyncio.wait(tasks, timeout=1.0)  # the sampling period
        for t in tasks:
            t.result()  # a client's error is the run's
        for _ in range(300):  # up to 30 s for the engine to go idle by itself
            m = metrics((await client.get("/metrics")).text, "status")
            if not any(m.get(f"sonar_llm_{g}") for g in (*IDLE, "cache_bytes")):
                break
            await asyncio.sleep(0.1)  # polling /metrics: the server has no idle event to await
    fives = sum(v for k, v in m.items() if "{5" in k and not k.endswith("{503}"))
    return {"outcomes": counts, "rss": rss, "server_5xx": fives, "idle_after": {
        g: m.get(f"sonar_llm_{g}", 0.0) for g in (*IDLE, "cache_bytes")
    }}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of load")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = ap.parse_args()
    print_header("soak: resident memory per 1000 requests under streaming load")
    from models import tiny

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        bundle = tiny.build(Path(tmp) / "bundle").root
        with ServerProcess(["--model", str(bundle), *ARGS], Path(tmp) / "server.log") as server:
            print(f"ready in {server.wait_ready(300):.0f} s", flush=True)
            result = asyncio.run(load(server, args.clients, args.duration))
            result["exit_code"] = server.stop(grace=30)
    rss = result.pop("rss")
    warm = rss[len(rss) // 8 :]  # the first eighth is the warm-up: caches and allocators fill
    xs, ys = [x for x, _ in warm], [y for _, y in warm]
    fit = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 2 else None
    result |= {
        "environment": environment(),
        "duration_s": args.duration,
        "requests_after_warmup": warm[-1][0] - warm[0][0],
        "rss_mb": {"warm": warm[0][1], "end": warm[-1][1], "max": max(mb for _, mb in warm)},
        "mb_per_1000_requests_fit": None if fit is None else round(fit * 1000, 3),
        "rss_samples": rss,
    }
    write_json(args.out, result)
    print(
        f"{result['outcomes']}; 5xx {result['server_5xx']:.0f}; idle after: "
        f"{result['idle_after']}; RSS {result['rss_mb']['warm']:.1f} -> "
        f"{result['rss_mb']['end']:.1f} MB, {result['mb_per_1000_requests_fit']} MB per 1000 "
        f"requests (fit); SIGTERM exit {result['exit_code']}"
    )
    clean = not any(result["idle_after"].values()) and result["exit_code"] == 0
    return 0 if clean and result["server_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
