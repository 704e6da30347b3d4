"""Memory: the server under more work than its memory holds must queue, never run out, and stay
within its cache budget plus the weights; loading must never hold a second copy of the weights;
minutes of streaming load must not grow the server's memory.

Serving (the default): `sonar-llm serve` with default settings on a full-size random bundle
gets 32 concurrent default requests (`max_sentences` 1 to bound the run), sampled every 0.5 s:
the server's resident memory, the allocated and reserved cache bytes, the running and waiting
counts; exits 1 unless all answer 200 within ready RSS + the cache budget (memory.json).

Loading (`--load`): each dtype loaded in a fresh process sampling /proc/self/status every 20 ms:
anonymous memory (RssAnon: the weights kept, any temporary copy; its peak against its value after
loading shows whether a second copy was made) apart from mapped checkpoint pages (RssFile: clean
page cache the kernel can drop). VmHWM, `ps`'s peak RSS, counts both (load_memory.json).

Soak (`--soak`): `sonar-llm serve` on the tiny bundle with small limits, closed-loop clients on
/generate and /v1/chat/completions (JSON and streams, a fifth of the streams left mid-way) for
`--duration` seconds: the server's resident memory growth per 1000 requests after the warm-up
(a least-squares fit); exits 1 on a 5xx but 503, a gauge left above 0 or an unclean SIGTERM exit
(soak.json). What each answer holds is tests/server/test_soak.py's.

    .venv/bin/python bench/memory.py --bundle DIR [--requests 32] [--limit 900]
    .venv/bin/python bench/memory.py --bundle DIR --load [--dtypes float32,bfloat16]
    .venv/bin/python bench/memory.py --soak [--duration 240] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, metrics, print_header, run_worker, write_json

from server.testing import ServerProcess

GIB = 1024**3
# Sampled while the requests run: the name in the samples -> the server's metric.
GAUGES = {"allocated": "cache_bytes{allocated}", "reserved": "cache_reserved_bytes"}
GAUGES |= {"running": "num_requests_running", "waiting": "num_requests_waiting"}


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
            m = metrics((await client.get("/metrics")).text, "state")
            sample = {"t": time.perf_counter() - t0, "rss": ps.memory_info().rss}
            samples.append(sample | {k: m.get(f"sonar_llm_{v}", 0.0) for k, v in GAUGES.items()})
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
        **{f"most_{k}": max(s[k] for s in samples) for k in GAUGES},  # cache bytes; requests
        "within_budget_plus_ready_rss": peak_rss <= rss_ready + budget,
        "samples": samples,
    }
    print(
        f"{requests} requests: {result['statuses']} in {run_seconds:.0f} s; at most "
        f"{result['most_running']:.0f} running and {result['most_waiting']:.0f} waiting; "
        f"cache allocated ≤ {result['most_allocated'] / GIB:.2f} GiB (reserved ≤ "
        f"{result['most_reserved'] / GIB:.2f}) of {budget / GIB:.2f} GiB; RSS "
        f"{rss_ready / GIB:.2f} → peak {peak_rss / GIB:.2f} GiB (ready + budget = "
        f"{(rss_ready + budget) / GIB:.2f} GiB)",
        flush=True,
    )
    return result


def proc_status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status (VmHWM, RssAnon, ...), in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[key] = int(value.split()[0]) * 1024
    return out


def load_worker(bundle: str, dtype: str) -> dict[str, Any]:
    """Load `bundle` in `dtype` in this process, sampling its memory every 20 ms."""
    from models.pipeline import SonarLLMPipeline

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = proc_status()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)

    before = proc_status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    pipe = SonarLLMPipeline.load(bundle, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = proc_status()
    # The three networks' parameters (the SONAR-LLM's unused token head is a meta tensor).
    modules = (pipe.model, *pipe.codec.modules())
    params = {id(p): p for m in modules for p in m.parameters() if not p.is_meta}
    return {
        "dtype": dtype,
        "load_s": seconds,
        "weights_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "before": before,
        "after": after,
        "peak_anon": max(peak["RssAnon"], after["RssAnon"]),
        "peak_file": max(peak["RssFile"], after["RssFile"]),
        "vm_hwm": after["VmHWM"],
    }


def loading(bundle: Path, dtypes: str) -> int:
    print_header("resident memory while loading, per dtype (each in a fresh process)")
    runs = []
    for dtype in dtypes.split(","):
        runs.append(run := run_worker(__file__, [bundle, dtype]))
        base = run["before"]["RssAnon"]
        print(
            f"{dtype:>9}: loaded in {run['load_s']:.1f} s; weights {run['weights_bytes'] / GIB:.2f}"
            f" GiB; anonymous {(run['after']['RssAnon'] - base) / GIB:.2f} GiB after loading, "
            f"peak {(run['peak_anon'] - base) / GIB:.2f} GiB (over the {base / GIB:.2f} GiB "
            f"before); mapped file pages peak {run['peak_file'] / GIB:.2f} GiB; VmHWM "
            f"{run['vm_hwm'] / GIB:.2f} GiB"
        )
    data = {"environment": environment(), "bundle": str(bundle), "runs": runs}
    write_json(RESULTS_DIR / "load_memory.json", data)
    return 0


# ----- soak: memory growth under minutes of streaming load ---------------------------------
SOAK_ARGS = ["--device", "cpu", "--max-running", "8", "--max-waiting", "8"]
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


async def soak_load(server: ServerProcess, clients: int, duration: float) -> dict[str, Any]:
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


def soaking(duration: float, clients: int) -> int:
    print_header("soak: resident memory per 1000 requests under streaming load")
    from models import tiny

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        bundle = tiny.build(Path(tmp) / "bundle").root
        argv = ["--model", str(bundle), *SOAK_ARGS, "--log-level", "warning"]
        with ServerProcess(argv, Path(tmp) / "server.log") as server:
            print(f"ready in {server.wait_ready(300):.0f} s", flush=True)
            result = asyncio.run(soak_load(server, clients, duration))
            result["exit_code"] = server.stop(grace=30)
    rss = result.pop("rss")
    warm = rss[len(rss) // 8 :]  # the first eighth is the warm-up: caches and allocators fill
    xs, ys = [x for x, _ in warm], [y for _, y in warm]
    fit = statistics.linear_regression(xs, ys).slope if len(set(xs)) > 2 else None
    result |= {
        "environment": environment(),
        "duration_s": duration,
        "requests_after_warmup": warm[-1][0] - warm[0][0],
        "rss_mb": {"warm": warm[0][1], "end": warm[-1][1], "max": max(mb for _, mb in warm)},
        "mb_per_1000_requests_fit": None if fit is None else round(fit * 1000, 3),
        "rss_samples": rss,
    }
    write_json(RESULTS_DIR / "soak.json", result)
    print(
        f"{result['outcomes']}; 5xx {result['server_5xx']:.0f}; idle after: "
        f"{result['idle_after']}; RSS {result['rss_mb']['warm']:.1f} -> "
        f"{result['rss_mb']['end']:.1f} MB, {result['mb_per_1000_requests_fit']} MB per 1000 "
        f"requests (fit); SIGTERM exit {result['exit_code']}"
    )
    clean = not any(result["idle_after"].values()) and result["exit_code"] == 0
    return 0 if clean and result["server_5xx"] == 0 else 1


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(load_worker(*sys.argv[2:4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="a --preset full bundle (not with --soak)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--limit", type=float, default=1800.0, help="seconds per request")
    parser.add_argument("--load", action="store_true", help="instead: memory while loading")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="with --load")
    parser.add_argument("--soak", action="store_true", help="instead: the soak (tiny bundle)")
    parser.add_argument("--duration", type=float, default=240.0, help="with --soak: seconds")
    parser.add_argument("--clients", type=int, default=16, help="with --soak")
    args = parser.parse_args()
    if args.soak:
        return soaking(args.duration, args.clients)
    if args.bundle is None:
        parser.error("--bundle is required (but with --soak)")
    if args.load:
        return loading(args.bundle, args.dtypes)
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
