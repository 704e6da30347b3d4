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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, print_header, write_json
from prometheus_client.parser import text_string_to_metric_families

from server.testing import ServerProcess

GIB = 1024**3


def metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value}, summed over labels; cache bytes also {name{state}}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            keys = [s.name]
            if "state" in s.labels:
                keys.append(f"{s.name}{{{s.labels['state']}}}")
            for key in keys:
                out[key] = out.get(key, 0.0) + s.value
    return out


async def run(server: ServerProcess, requests: int, limit: float) -> dict[str, Any]:
    ps = psutil.Process(server.pid)
    samples: list[dict[str, float]] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(limit)) as client:
        t0 = time.perf_counter()
        info = (await client.get("/info")).json()
        budget = info["cache_memory"]["limit_bytes"]
        rss_ready = ps.memory_info().rss
        print(
            f"RSS when ready {rss_ready / GIB:.2f} GiB, cache budget "
            f"{budget / GIB:.2f} GiB in {info['cache_memory']['pages']} pages",
            flush=True,
        )

        async def one(i: int) -> int:
            body = {"prompt": f"Request {i} asks a question. It waits.", "max_sentences": 1}
            return (await client.post("/generate", json=body)).status_code

        t_load = time.perf_counter()
        answers = asyncio.gather(*(one(i) for i in range(requests)))
        while not answers.done():  # a sample every 0.5 s until all have answered
            m = metrics((await client.get("/metrics")).text)
            samples.append(
                {
                    "t": time.perf_counter() - t0,
                    "rss": ps.memory_info().rss,
                    "allocated": m.get("sonar_llm_cache_bytes{allocated}", 0.0),
                    "reserved": m.get("sonar_llm_cache_reserved_bytes", 0.0),
                    "running": m.get("sonar_llm_num_requests_running", 0.0),
                    "waiting": m.get("sonar_llm_num_requests_waiting", 0.0),
                }
            )
            await asyncio.wait([answers], timeout=0.5)
        statuses = answers.result()
        run_seconds = time.perf_counter() - t_load
    peak_rss = max(s["rss"] for s in samples)
    result = {
        "requests": requests,
        "statuses": {str(c): statuses.count(c) for c in sorted(set(statuses))},
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a --preset full bundle")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds per request")
    args = parser.parse_args()
    print_header("the server at the released sizes: admission by memory")
    with (
        tempfile.TemporaryDirectory(prefix="memory-") as tmp,
        ServerProcess(["--model", str(args.bundle)], Path(tmp) / "server.log") as server,
    ):
        ready_seconds = server.wait_ready(600)
        print(f"ready in {ready_seconds:.0f} s", flush=True)
        result = asyncio.run(run(server, args.requests, args.limit))
        result["load_seconds"] = ready_seconds
        server.stop(grace=60)
    result["bundle"] = str(args.bundle)
    write_json(RESULTS_DIR / "memory.json", {"environment": environment(), **result})
    return 0 if set(result["statuses"]) == {"200"} and result["within_budget_plus_ready_rss"] else 1


if __name__ == "__main__":
    sys.exit(main())
