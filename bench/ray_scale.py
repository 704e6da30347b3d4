"""Ray Serve scale-out: throughput of two replicas against one, side by side in one run.

One local Ray cluster, one Serve application; rounds alternate between 1 and 2 replicas
(`serve.run` of the same application with another `replicas`: the first replica stays, a
second joins or leaves), so load changes on the machine hit both sides. Each round sends the
same closed-loop workload (`--concurrency` clients, `--requests` requests, `eos_threshold` 1.0
so each makes exactly `--max-sentences` sentences) to `POST /generate` through Serve's proxy.
The verdict is the median of the per-round ratios (sentences/s, 2 replicas / 1).

    .venv/bin/python bench/ray_scale.py [--bundle DIR] [--requests 32] [--concurrency 8]
                                        [--rounds 2] [--max-sentences 4] [--num-cpus 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, print_header

PROMPTS = [
    "The cat runs home. It is late. The moon is up.",
    "A small dog sees the moon today.",
    "Mother reads a book. Father sings a song.",
    "Night falls. Stars appear. The river sings.",
]


def run_round(url: str, requests: int, concurrency: int, max_sentences: int) -> dict[str, Any]:
    def one(i: int) -> tuple[float, int, str]:
        body = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_sentences": max_sentences,
            "max_tokens": 32,
            "eos_threshold": 1.0,
        }
        start = time.perf_counter()
        with httpx.Client(timeout=600) as client:
            r = client.post(url + "/generate", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, len(r.json()["sentences"]), r.headers["x-replica-id"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    sentences = sum(n for _, n, _ in results)
    latencies = [t for t, _, _ in results]
    return {
        "wall_s": round(wall, 3),
        "requests": requests,
        "sentences": sentences,
        "requests_per_s": round(requests / wall, 3),
        "sentences_per_s": round(sentences / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "replicas_answering": len({r for _, _, r in results}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", help="model bundle dir (default: build the tiny demo bundle)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-sentences", type=int, default=4)
    ap.add_argument("--num-cpus", type=float, default=4, help="CPUs the local Ray declares")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-memory", default="256MiB")
    ap.add_argument("--output", default=str(RESULTS_DIR / "ray_scale.json"))
    args = ap.parse_args()
    print_header("Ray Serve: 2 replicas vs 1, same workload through Serve's proxy")

    import ray
    from ray import serve

    from models import tiny
    from server.ray_app import build, split_args
    from server.ray_cli import start_ray

    bundle = args.bundle or str(tiny.build(Path(tempfile.mkdtemp()) / "bundle").root)
    os.environ.pop("RAY_ADDRESS", None)
    start_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = 8000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    base = {
        "model": bundle,
        "device": args.device,
        "cache_memory": args.cache_memory,
        "num_cpus": "1",
    }
    rounds: list[dict[str, Any]] = []
    try:
        for n in range(args.rounds):
            order = (1, 2) if n % 2 == 0 else (2, 1)
            for replicas in order:
                settings, scale = split_args({**base, "replicas": str(replicas)})
                serve.run(build(settings, scale), name="bench", route_prefix="/")
                run_round(url, 4, 4, 1)  # warm: every replica answers once
                result = {"round": n, "replicas": replicas}
                result |= run_round(url, args.requests, args.concurrency, args.max_sentences)
                print(
                    f"round {n} replicas {replicas}: {result['sentences_per_s']:.2f} sentences/s, "
                    f"{result['requests_per_s']:.2f} requests/s, p50 {result['latency_p50_s']}s "
                    f"({result['replicas_answering']} replicas answered)",
                    flush=True,
                )
                rounds.append(result)
    finally:
        serve.shutdown()
        ray.shutdown()

    ratios = []
    for n in range(args.rounds):
        by = {r["replicas"]: r for r in rounds if r["round"] == n}
        ratios.append(by[2]["sentences_per_s"] / by[1]["sentences_per_s"])
    summary = {
        "sentences_per_s_1_replica": statistics.median(
            r["sentences_per_s"] for r in rounds if r["replicas"] == 1
        ),
        "sentences_per_s_2_replicas": statistics.median(
            r["sentences_per_s"] for r in rounds if r["replicas"] == 2
        ),
        "ratio_2_over_1_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }
    print(f"# 2 replicas / 1 replica (median of rounds): {summary['ratio_2_over_1_median']:.2f}x")
    out = {
        "benchmark": "ray_scale",
        "environment": environment(),
        "config": vars(args),
        "rounds": rounds,
        "summary": summary,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
