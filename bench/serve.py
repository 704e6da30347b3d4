"""Serving load generator: the same streaming workload in-process (Engine) and over HTTP + SSE.

Goal (issue): time to first sentence, inter-sentence latency, end-to-end p50/p99 and sentences/s,
with the HTTP+SSE path within 10% of the engine driven in-process.

  in-process: `server.engine.Engine` in this process; each request is `submit()` + iterating
              its events (no HTTP, no JSON).
  HTTP:       `sonar-llm serve` in a subprocess on a free 127.0.0.1 port; each request is
              `POST /generate` with `stream: true`, read with httpx + httpx-sse (JSON parsed).
Both load the same bundle with the same engine limits and run the same prompts with the same
options (beam search, `eos_threshold` 1.0 so every request makes exactly `--max-sentences`).
Load: `--concurrency N` closed-loop clients, or `--rate R` Poisson arrivals (`--burstiness` < 1
burstier, > 1 steadier; same arrival schedule for both sides). Rounds alternate the order
(A B, B A, ...) so load changes on the machine hit both sides; the verdict uses the median of
the per-round ratios.

    .venv/bin/python bench/serve.py [--quick] [--bundle DIR] [--concurrency 8 | --rate 4]
                                    [--requests 64] [--rounds 12] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import torch
from httpx_sse import aconnect_sse
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO_ROOT,
    RESULTS_DIR,
    environment,
    fmt_ms,
    loadavg,
    percentile,
    print_header,
    pyplot,
    write_json,
)

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.engine import Engine, EngineConfig, FinalEvent, GenerationRequest, SentenceEvent

GOAL_OVERHEAD = 0.10
MODES = ("in-process", "http")
REQUEST_TIMEOUT = 300.0  # the server's default per-request deadline; used on both sides
ROUND_TIMEOUT = 600.0
WORDS = (
    "the a old new quick lazy happy little cat dog fox bird tree river house garden city road "
    "sun moon star girl boy mother father friend teacher story book song day night morning "
    "runs sees finds likes wants makes walks plays reads writes sings opens was is had will "
    "and but then when after with under over near very always never often today again"
).split()


# ----- the workload -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prompts: list[str]
    max_sentences: int
    max_tokens: int
    beam_size: int
    concurrency: int | None  # closed loop with N clients, or
    arrivals: list[float] | None  # Poisson: offsets (s) from the round's start

    def options(self) -> GenerationOptions:
        """What the server builds from `body()` (every other field at its default)."""
        return GenerationOptions(
            max_sentences=self.max_sentences,
            eos_threshold=1.0,
            decode=DecodeOptions(beam_size=self.beam_size, max_tokens=self.max_tokens),
        )

    def body(self, i: int) -> dict[str, Any]:
        return {
            "prompt": self.prompts[i],
            "max_sentences": self.max_sentences,
            "max_tokens": self.max_tokens,
            "beam_size": self.beam_size,
            "eos_threshold": 1.0,
            "stream": True,
        }


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompts of 1-4 short sentences, the same for every run with this seed."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + "."

    return [" ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(n)]


def poisson_arrivals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Arrival offsets with gamma inter-arrival times (burstiness 1 = Poisson), mean 1/rate."""
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


# ----- one request's timeline -------------------------------------------------------------------
@dataclass
class Trace:
    index: int
    t0: float = 0.0  # perf_counter at submission
    sentences: list[float] = field(default_factory=list)  # arrival time of each sentence
    texts: list[str] = field(default_factory=list)
    end: float | None = None
    error: str | None = None

    @property
    def ttfs(self) -> float | None:
        return self.sentences[0] - self.t0 if self.sentences else None

    @property
    def isl(self) -> list[float]:
        return [b - a for a, b in zip(self.sentences, self.sentences[1:], strict=False)]

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.t0


Client = Callable[[int], Awaitable[Trace]]


def in_process_client(engine: Engine, wl: Workload) -> Client:
    opts = wl.options()

    async def one(i: int) -> Trace:
        tr = Trace(i, t0=time.perf_counter())
        stream = await engine.submit(
            GenerationRequest(wl.prompts[i], opts, timeout=REQUEST_TIMEOUT)
        )
        async for event in stream:
            now = time.perf_counter()
            if isinstance(event, SentenceEvent):
                tr.sentences.append(now)
                tr.texts.append(event.text)
            elif isinstance(event, FinalEvent):
                tr.end = now
                if event.finish_reason not in ("stop", "length"):
                    tr.error = f"{event.finish_reason}: {event.error}"
        return tr

    return one


def http_client(client: httpx.AsyncClient, wl: Workload) -> Client:
    async def one(i: int) -> Trace:
        tr = Trace(i, t0=time.perf_counter())
        try:
            async with aconnect_sse(client, "POST", "/generate", json=wl.body(i)) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    tr.error = f"HTTP {source.response.status_code}: {source.response.text}"
                    return tr
                async for sse in source.aiter_sse():
                    now = time.perf_counter()
                    if sse.event == "sentence":
                        tr.sentences.append(now)
                        tr.texts.append(json.loads(sse.data)["text"])
                    elif sse.event == "done":
                        tr.end = now
                        break
                    elif sse.event == "error":
                        tr.end, tr.error = now, sse.data
                        break
        except httpx.HTTPError as e:
            tr.error = f"{type(e).__name__}: {e}"
        if tr.end is None and tr.error is None:
            tr.error = "stream ended without a done event"
        return tr

    return one


async def drive(one: Client, wl: Workload, n: int) -> tuple[list[Trace], float]:
    """Requests 0..n-1 under the workload's load pattern; (traces, wall seconds)."""
    traces: list[Trace] = []
    start = time.perf_counter()
    if wl.arrivals is None:
        assert wl.concurrency is not None
        indexes = iter(range(n))

        async def worker() -> None:
            for i in indexes:  # shared iterator: each client takes the next request
                traces.append(await one(i))

        await asyncio.gather(*(worker() for _ in range(min(wl.concurrency, n))))
    else:

        async def arrive(i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            traces.append(await one(i))

        await asyncio.gather(*(arrive(i, at) for i, at in enumerate(wl.arrivals[:n])))
    ends = [t.end for t in traces if t.end is not None]
    return sorted(traces, key=lambda t: t.index), (max(ends) if ends else start) - start


# ----- statistics -------------------------------------------------------------------------------
def summarize(traces: list[Trace], wall: float) -> dict[str, Any]:
    ok = [t for t in traces if t.error is None]
    ttfs = [t.ttfs for t in ok if t.ttfs is not None]
    isl = [x for t in ok for x in t.isl]
    e2e = [t.e2e for t in ok if t.e2e is not None]
    sentences = sum(len(t.sentences) for t in ok)

    def pct(xs: list[float]) -> dict[str, float | None]:
        return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "mean": _mean(xs)}

    return {
        "requests": len(traces),
        "failed": len(traces) - len(ok),
        "errors": sorted({t.error for t in traces if t.error})[:5],
        "sentences": sentences,
        "wall_s": wall,
        "sentences_per_s": sentences / wall if wall > 0 else None,
        "ttfs_s": pct(ttfs),
        "isl_s": pct(isl),
        "e2e_s": pct(e2e),
    }


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _overhead(sps_ratio: float | None, e2e_ratio: float | None) -> float | None:
    parts = []
    if sps_ratio is not None:
        parts.append(1 - sps_ratio)  # throughput lost
    if e2e_ratio is not None:
        parts.append(e2e_ratio - 1)  # latency added
    return max(parts) if parts else None


def pooled(rounds: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """All rounds of one side together; CPU time per sentence of both processes."""
    traces = [t for r in rounds for t in r["traces"][mode]]
    out = summarize(traces, sum(r["summary"][mode]["wall_s"] for r in rounds))
    cpu = {
        k: sum(r["summary"][mode]["cpu_s"][k] for r in rounds)
        for k in ("bench_process", "server_process")
    }
    out["cpu_s"] = cpu
    per_round = [r["summary"][mode]["engine"] for r in rounds]
    out["engine"] = {
        key: _mean([e[key] for e in per_round if e[key] is not None]) for key in per_round[0]
    }
    out["cpu_ms_per_sentence"] = (
        1e3 * sum(cpu.values()) / out["sentences"] if out["sentences"] else None
    )
    return out


def overhead(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round paired ratios HTTP / in-process and their medians (what the verdict uses)."""
    sps, e2e = [], []
    for r in rounds:
        a, b = r["summary"]["in-process"], r["summary"]["http"]
        if a["sentences_per_s"] and b["sentences_per_s"]:
            sps.append(b["sentences_per_s"] / a["sentences_per_s"])
        if a["e2e_s"]["p50"] and b["e2e_s"]["p50"]:
            e2e.append(b["e2e_s"]["p50"] / a["e2e_s"]["p50"])
    sps_ratio = statistics.median(sps) if sps else None
    e2e_ratio = statistics.median(e2e) if e2e else None
    worst = _overhead(sps_ratio, e2e_ratio)
    # How far noise moves that verdict: resample the rounds (pairs kept together).
    rng = random.Random(0)
    boot: list[float] = []
    for _ in range(2000) if len(sps) == len(e2e) and len(sps) > 1 else ():
        picks = [rng.randrange(len(sps)) for _ in sps]
        resampled = _overhead(
            statistics.median(sps[i] for i in picks), statistics.median(e2e[i] for i in picks)
        )
        if resampled is not None:
            boot.append(resampled)
    interval = [percentile(boot, 2.5), percentile(boot, 97.5)] if boot else None
    return {
        "sentences_per_s_ratio": sps_ratio,  # HTTP / in-process (1.0 = no loss)
        "e2e_p50_ratio": e2e_ratio,  # HTTP / in-process (1.0 = no added latency)
        "per_round_sentences_per_s_ratio": sps,
        "per_round_e2e_p50_ratio": e2e,
        "overhead": worst,  # max(throughput loss, added p50 latency), fraction
        "overhead_95ci": interval,  # bootstrap over rounds
        "goal": GOAL_OVERHEAD,
        "pass": worst is not None and worst < GOAL_OVERHEAD,
    }


# ----- what the engine itself measured (its Prometheus metrics, either side) ------------------
ENGINE_SERIES = {
    "iteration": "sonar_llm_iteration_duration_seconds",
    "batch": "sonar_llm_batch_size",
    "ttfs": "sonar_llm_time_to_first_sentence_seconds",
    "isl": "sonar_llm_inter_sentence_latency_seconds",
}


def parse_metrics(text: str) -> dict[str, float]:
    """`<histogram>_sum` / `_count` of the engine series (Prometheus text format)."""
    wanted = {f"{name}_{part}" for name in ENGINE_SERIES.values() for part in ("sum", "count")}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Means over one run: iteration seconds, batch size, engine-side TTFS and ISL."""
    out: dict[str, Any] = {}
    for key, name in ENGINE_SERIES.items():
        n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
        total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
        out[f"{key}_mean"] = total / n if n else None
        if key == "iteration":
            out["iterations"] = n
    return out


# ----- the server subprocess --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`sonar-llm serve` on a free loopback port; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv_tail: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        script = Path(sys.executable).parent / "sonar-llm"
        head = [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]
        self.argv = [*head, "serve", "--host", "127.0.0.1", "--port", str(self.port), *argv_tail]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, torch_threads: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SONAR_LLM_")}
        if torch_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch_threads)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        assert self.proc is not None
        try:
            t = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 180.0) -> float:
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=self.base, timeout=2.0) as client:
            while time.perf_counter() - t0 < timeout:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({self.proc.returncode}):\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health/ready")).status_code == 200:
                        return time.perf_counter() - t0
                await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def bundle_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        t0 = time.perf_counter()
        tiny.build(Path(tmp) / "bundle")
        print(f"# built the tiny bundle in {time.perf_counter() - t0:.1f}s")
        yield Path(tmp) / "bundle"


# ----- the run ----------------------------------------------------------------------------------
async def run(args: argparse.Namespace, bundle: Path, log_path: Path) -> dict[str, Any]:
    wl = Workload(
        prompts=make_prompts(args.requests, args.seed),
        max_sentences=args.max_sentences,
        max_tokens=args.max_tokens,
        beam_size=args.beam_size,
        concurrency=None if args.rate else args.concurrency,
        arrivals=(
            poisson_arrivals(args.requests, args.rate, args.burstiness, args.seed)
            if args.rate
            else None
        ),
    )
    limits = ["--max-running", str(args.max_running), "--max-waiting", str(args.requests)]
    server = Server(
        [
            "--model",
            str(bundle),
            *limits,
            "--max-sentences-limit",
            str(max(args.max_sentences, 8)),
            "--log-level",
            "warning",
            *(["--device", args.device] if args.device else []),
        ],
        log_path,
    )
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    server.start(args.torch_threads)
    try:
        # Load the in-process side while the server loads: both are ready before round 1.
        pipe = await asyncio.to_thread(SonarLLMPipeline.load, bundle, device=args.device)
        ready_s = await server.wait_ready()
        print(f"# server ready in {ready_s:.1f}s: {' '.join(server.argv)}")
        engine = Engine(pipe, EngineConfig(max_running=args.max_running, max_waiting=args.requests))
        engine.start()
        limits_http = httpx.Limits(max_connections=args.requests, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=server.base, timeout=httpx.Timeout(REQUEST_TIMEOUT), limits=limits_http
        ) as client:
            clients = {"in-process": in_process_client(engine, wl), "http": http_client(client, wl)}

            async def scrape_server() -> dict[str, float]:
                return parse_metrics((await client.get("/metrics")).text)

            async def scrape_engine() -> dict[str, float]:
                return parse_metrics(generate_latest(engine.registry).decode())

            engine_metrics = {"in-process": scrape_engine, "http": scrape_server}
            warm = min(args.requests, max(2, wl.concurrency or 4))
            for mode in MODES:  # lazy init, encoder cache for the prompts, keep-alive pool
                traces, _ = await drive(clients[mode], wl, warm)
                bad = [t.error for t in traces if t.error]
                if bad:
                    raise RuntimeError(f"warm-up failed ({mode}): {bad[0]}")
            rounds = []
            for r in range(args.rounds):
                order = MODES if r % 2 == 0 else MODES[::-1]
                entry: dict[str, Any] = {
                    "round": r,
                    "order": list(order),
                    "traces": {},
                    "summary": {},
                    "loadavg": loadavg(),
                }
                for mode in order:
                    scrape = engine_metrics[mode]
                    before = (time.process_time(), server.cpu_seconds(), await scrape())
                    traces, wall = await asyncio.wait_for(
                        drive(clients[mode], wl, args.requests), ROUND_TIMEOUT
                    )
                    after = (time.process_time(), server.cpu_seconds(), await scrape())
                    entry["traces"][mode] = traces
                    entry["summary"][mode] = summarize(traces, wall) | {
                        "cpu_s": {
                            "bench_process": after[0] - before[0],
                            "server_process": after[1] - before[1],
                        },
                        "engine": metric_deltas(before[2], after[2]),
                    }
                rounds.append(entry)
                print_round(entry)
        engine.stop()
    finally:
        server.stop()
    return {"workload": wl, "rounds": rounds, "server_argv": server.argv}


def print_round(entry: dict[str, Any]) -> None:
    for mode in entry["order"]:
        s = entry["summary"][mode]
        print(
            f"  round {entry['round']} {mode:>10}: {s['sentences_per_s']:7.2f} sent/s  "
            f"TTFS p50 {fmt_ms(s['ttfs_s']['p50']):>7} ms  ISL p50 {fmt_ms(s['isl_s']['p50']):>7}"
            f" ms  E2E p50 {fmt_ms(s['e2e_s']['p50']):>7} ms  failed {s['failed']}"
            f"  (load {entry['loadavg'][:1]})"
        )


def identical_outputs(rounds: list[dict[str, Any]]) -> dict[str, int]:
    """Per prompt, whether both paths produced the same sentences (batching must not matter)."""
    a = {t.index: t.texts for t in rounds[0]["traces"]["in-process"] if t.error is None}
    b = {t.index: t.texts for t in rounds[0]["traces"]["http"] if t.error is None}
    common = a.keys() & b.keys()
    return {"compared": len(common), "identical": sum(a[i] == b[i] for i in common)}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rounds = result["rounds"]
    table = {mode: pooled(rounds, mode) for mode in MODES}
    ratios = overhead(rounds)
    same = identical_outputs(rounds)
    print()
    print(f"{'pooled over ' + str(len(rounds)) + ' rounds':<24}{'in-process':>14}{'HTTP+SSE':>14}")
    rows = [
        ("sentences/s", "sentences_per_s", None, lambda v: f"{v:.2f}"),
        ("TTFS p50 (ms)", "ttfs_s", "p50", fmt_ms),
        ("TTFS p99 (ms)", "ttfs_s", "p99", fmt_ms),
        ("inter-sentence p50 (ms)", "isl_s", "p50", fmt_ms),
        ("inter-sentence p99 (ms)", "isl_s", "p99", fmt_ms),
        ("end-to-end p50 (ms)", "e2e_s", "p50", fmt_ms),
        ("end-to-end p99 (ms)", "e2e_s", "p99", fmt_ms),
    ]
    for label, key, sub, fmt in rows:
        cells = []
        for mode in MODES:
            v = table[mode][key] if sub is None else table[mode][key][sub]
            cells.append("-" if v is None else fmt(v))
        print(f"{label:<24}{cells[0]:>14}{cells[1]:>14}")
    failed = sum(table[m]["failed"] for m in MODES)
    fails = [table[m]["failed"] for m in MODES]
    print(f"{'failed requests':<24}{fails[0]:>14}{fails[1]:>14}")
    for label, key, scale in (
        ("engine iteration (ms)", "iteration_mean", 1e3),
        ("engine batch size", "batch_mean", 1.0),
        ("engine TTFS mean (ms)", "ttfs_mean", 1e3),
        ("engine ISL mean (ms)", "isl_mean", 1e3),
    ):
        vals = [table[m]["engine"].get(key) for m in MODES]
        cells = ["-" if v is None else f"{v * scale:.1f}" for v in vals]
        print(f"{label:<24}{cells[0]:>14}{cells[1]:>14}   (engine's own metrics, round means)")
    cpu = [table[m]["cpu_ms_per_sentence"] for m in MODES]
    print(f"{'CPU ms per sentence':<24}{_f1(cpu[0]):>14}{_f1(cpu[1]):>14}   (both processes)")
    print(f"outputs identical across paths (round 0): {same['identical']}/{same['compared']}")
    print(
        "HTTP / in-process, median of per-round ratios: sentences/s "
        f"{_f3(ratios['sentences_per_s_ratio'])} (per round "
        f"{', '.join(map(_f3, ratios['per_round_sentences_per_s_ratio']))}); e2e p50 "
        f"{_f3(ratios['e2e_p50_ratio'])} (per round "
        f"{', '.join(map(_f3, ratios['per_round_e2e_p50_ratio']))})"
    )
    verdict = "PASS" if ratios["pass"] and not failed else "FAIL"
    worst, ci = ratios["overhead"], ratios["overhead_95ci"]
    noise = ""
    if ci is not None:
        noise = f"; 95% interval over rounds {ci[0]:.1%} .. {ci[1]:.1%}"
        if ci[0] < GOAL_OVERHEAD <= ci[1]:
            noise += " (straddles the goal: machine noise decides, rerun on a quiet machine)"
    print(
        f"{verdict}: HTTP+SSE overhead {'-' if worst is None else f'{worst:.1%}'} "
        f"(goal < {GOAL_OVERHEAD:.0%}; the larger of throughput lost and p50 end-to-end "
        f"latency added){noise}" + (f"; {failed} requests failed" if failed else "")
    )
    wl: Workload = result["workload"]
    return {
        "benchmark": "serve",
        "environment": environment(),
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "bundle": str(args.bundle) if args.bundle else "tiny (built in a temp dir)",
            "load": (
                f"Poisson rate {args.rate}/s, burstiness {args.burstiness}"
                if args.rate
                else f"closed loop, concurrency {args.concurrency}"
            ),
            "server_argv": result["server_argv"],
            "options": {k: v for k, v in wl.body(0).items() if k != "prompt"},
        },
        "summary": table,
        "overhead": ratios,
        "outputs": same,
        "pass": verdict == "PASS",
        "rounds": [
            {k: v for k, v in r.items() if k != "traces"}
            | {"requests": {m: [trace_dict(t) for t in r["traces"][m]] for m in MODES}}
            for r in rounds
        ],
    }


def _f1(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _f3(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def trace_dict(t: Trace) -> dict[str, Any]:
    d = asdict(t)
    d.pop("texts")
    d["sentences"] = [round(x - t.t0, 6) for x in t.sentences]
    d["end"] = None if t.end is None else round(t.end - t.t0, 6)
    d.pop("t0")
    return d


def plot(result: dict[str, Any], out: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = {"in-process": "tab:blue", "http": "tab:orange"}
    rounds = result["rounds"]
    metrics = [
        ("time to first sentence (ms)", lambda t: [t.ttfs] if t.ttfs is not None else []),
        ("inter-sentence latency (ms)", lambda t: t.isl),
        ("end-to-end latency (ms)", lambda t: [t.e2e] if t.e2e is not None else []),
    ]
    for ax, (label, get) in zip(axes.flat, metrics, strict=False):
        for mode in MODES:
            xs = sorted(
                1e3 * x for r in rounds for t in r["traces"][mode] if not t.error for x in get(t)
            )
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=mode, color=colors[mode])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[3]
    width = 0.38
    for k, mode in enumerate(MODES):
        xs = [r["round"] + (k - 0.5) * width for r in rounds]
        ys = [r["summary"][mode]["sentences_per_s"] or 0 for r in rounds]
        ax.bar(xs, ys, width, label=mode, color=colors[mode])
    for r in rounds:
        a, b = (r["summary"][m]["sentences_per_s"] or 0 for m in MODES)
        if a and b:
            ax.annotate(f"{b / a:.2f}", (r["round"], max(a, b)), ha="center", va="bottom", size=8)
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xticklabels(
        [f"{r['round']}\n{'A' if r['order'][0] == MODES[0] else 'B'} first" for r in rounds],
        size=8,
    )
    ax.set_xlabel("round (A = in-process, B = HTTP; label: B/A sentences/s)")
    ax.set_ylabel("sentences/s")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small run (< 60 s), serve-quick.*")
    p.add_argument("--bundle", type=Path, help="a built bundle dir (default: build the tiny one)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed-loop clients (default 8)")
    load.add_argument("--rate", type=float, help="Poisson arrivals per second instead")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape for --rate")
    p.add_argument(
        "--requests", type=int, help="requests per round and side (default 64; --quick 16)"
    )
    p.add_argument("--rounds", type=int, help="A/B rounds (default 12; --quick 4)")
    p.add_argument("--max-sentences", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-running", type=int, default=32, help="engine batch limit, both sides")
    p.add_argument("--device", help="cpu, cuda (default: cuda if present)")
    p.add_argument(
        "--torch-threads", type=int, help="torch intra-op threads, both sides (default: torch's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results .json (the plot goes next to it)")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = None if args.rate else args.concurrency or (4 if quick else 8)
    args.requests = args.requests or (16 if quick else 64)
    args.rounds = args.rounds or (4 if quick else 12)
    if args.quick and args.max_sentences == 4:
        args.max_sentences = 3
    if args.requests < 1 or args.rounds < 1 or (args.rate is not None and args.rate <= 0):
        p.error("--requests and --rounds must be >= 1, --rate > 0")
    if args.burstiness <= 0:
        p.error("--burstiness must be > 0")
    args.out = args.out or RESULTS_DIR / ("serve-quick.json" if quick else "serve.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print_header("serving overhead: Engine in-process vs HTTP + SSE (same workload, A/B rounds)")
    load = (
        f"Poisson {args.rate}/s (burstiness {args.burstiness})"
        if args.rate
        else f"{args.concurrency} closed-loop clients"
    )
    print(
        f"# {args.requests} requests per round and side, {args.rounds} rounds, {load}; "
        f"{args.max_sentences} sentences each, max_tokens {args.max_tokens}, "
        f"beam {args.beam_size}"
    )
    t0 = time.perf_counter()
    with bundle_dir(args.bundle) as bundle, tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        result = asyncio.run(run(args, bundle, log_path))
    data = report(result, args)
    data["elapsed_s"] = time.perf_counter() - t0
    write_json(args.out, data)
    png = args.out.with_suffix(".png")
    plot(result, png, f"HTTP+SSE vs in-process engine ({load}, tiny bundle)")
    print(f"# wrote {args.out} and {png} ({data['elapsed_s']:.0f}s)")
    return 0 if data["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
