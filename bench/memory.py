"""The server at the released sizes under more work than its memory holds: it must queue, never
run out, and stay within its cache budget plus the weights.

Starts `sonar-llm serve` with DEFAULT settings on a full-size random bundle (`sonar-llm tiny DIR
--preset full`), waits until ready, reads the cache budget from `/info`, then sends 32 concurrent
default requests (beam 5, `max_tokens` 256; `max_sentences` 1 to bound the run) and samples,
every 0.5 s: the process's resident memory (RSS), the allocated and reserved cache bytes, the
running and waiting counts. Reported: RSS after loading (≈ the weights), peak RSS, the budget,
peak allocated cache bytes, how many requests ran at once, and that all 32 completed.

    .venv/bin/python bench/memory.py --bundle /path/to/full-bundle [--requests 32] [--limit 900]

Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, environment, print_header, write_json
from soak import free_port, parse_metrics, sonar_llm_command

GIB = 1024**3


def cache_bytes(m: dict[str, float], state: str) -> float:
    return sum(
        v for k, v in m.items() if k.startswith("sonar_llm_cache_bytes{") and f"state={state}" in k
    )


async def run(bundle: Path, requests: int, limit: float, log_path: Path) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [*sonar_llm_command(), "serve", "--model", str(bundle), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SONAR_LLM_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    ps = psutil.Process(proc.pid)
    samples: list[dict[str, float]] = []
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(limit)) as client:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {log_path.read_text()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{base}/health/ready")).status_code == 200:
                        break
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError("not ready after 600 s")
                await asyncio.sleep(1.0)
            load_seconds = time.perf_counter() - t0
            info = (await client.get(f"{base}/info")).json()
            budget = info["cache_memory"]["limit_bytes"]
            rss_ready = ps.memory_info().rss
            print(
                f"ready in {load_seconds:.0f} s: RSS {rss_ready / GIB:.2f} GiB, cache budget "
                f"{budget / GIB:.2f} GiB in {info['cache_memory']['pages']} pages",
                flush=True,
            )
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    m = parse_metrics((await client.get(f"{base}/metrics")).text)
                    samples.append(
                        {
                            "t": time.perf_counter() - t0,
                            "rss": ps.memory_info().rss,
                            "allocated": cache_bytes(m, "allocated"),
                            "reserved": m.get("sonar_llm_cache_reserved_bytes", 0.0),
                            "running": m.get("sonar_llm_num_requests_running", 0.0),
                            "waiting": m.get("sonar_llm_num_requests_waiting", 0.0),
                        }
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), 0.5)

            async def one(i: int) -> int:
                body = {"prompt": f"Request {i} asks a question. It waits.", "max_sentences": 1}
                r = await client.post(f"{base}/generate", json=body)
                return r.status_code

            sampler = asyncio.ensure_future(sample())
            t_load = time.perf_counter()
            statuses = await asyncio.gather(*(one(i) for i in range(requests)))
            run_seconds = time.perf_counter() - t_load
            done.set()
            await sampler
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    peak_rss = max(s["rss"] for s in samples)
    result = {
        "bundle": str(bundle),
        "requests": requests,
        "statuses": {str(c): statuses.count(c) for c in sorted(set(statuses))},
        "load_seconds": load_seconds,
        "run_seconds": run_seconds,
        "rss_ready_bytes": rss_ready,
        "peak_rss_bytes": peak_rss,
        "cache_budget_bytes": budget,
        "peak_allocated_bytes": max(s["allocated"] for s in samples),
        "peak_reserved_bytes": max(s["reserved"] for s in samples),
        "most_running": max(s["running"] for s in samples),
        "most_waiting": max(s["waiting"] for s in samples),
        "within_budget_plus_ready_rss": peak_rss <= rss_ready + budget,
        "samples": samples,
    }
    print(
        f"{requests} requests: {result['statuses']} in {run_seconds:.0f} s; at most "
        f"{result['most_running']:.0f} running and {result['most_waiting']:.0f} waiting; "
        f"cache allocated ≤ {result['peak_allocated_bytes'] / GIB:.2f} GiB (reserved ≤ "
        f"{result['peak_reserved_bytes'] / GIB:.2f}) of {budget / GIB:.2f} GiB; RSS "
        f"{rss_ready / GIB:.2f} → peak {peak_rss / GIB:.2f} GiB (ready + budget = "
        f"{(rss_ready + budget) / GIB:.2f} GiB)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a --preset full bundle")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds per request")
    args = parser.parse_args()
    print_header("the server at the released sizes: admission by memory")
    log_path = RESULTS_DIR / "memory-server.log.tmp"
    result = asyncio.run(run(args.bundle, args.requests, args.limit, log_path))
    write_json(RESULTS_DIR / "memory.json", {"environment": environment(), **result})


if __name__ == "__main__":
    main()
