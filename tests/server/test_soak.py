"""The real server under mixed, bursty load with disconnects, for a bounded time (~1 minute).

What only load shows, with `sonar-llm serve` as a subprocess on loopback (tiny bundle, small
limits): closed-loop clients on every generation route (native and OpenAI, JSON and streams),
a fifth of the streams closed by the client mid-way, bad requests in between, and bursts past
`max_running + max_waiting`. Then:

* every well-formed request got a complete, well-ordered answer or a 503 with Retry-After; bad
  ones their 4xx; nothing else, and the server counted no 5xx (single bad inputs are
  test_api.py's: here they only share the server with the load);
* running, waiting, reserved and cached bytes and the decoder's rows all go back to 0;
* cancellations add up: every admitted request finishes exactly once, and
  Δcancelled == disconnects − finished anyway, where "finished anyway" (a disconnect that raced
  with the request's own end) = Δfinished{its own ends} − the finals the clients received.
  Disconnecting streams turn EOS off, so one that leaves with >= EARLY_MARGIN sentences still
  to come cannot have finished by itself: a server that never cancels fails;
* resident memory after warm-up grows less than a tripwire for gross leaks (`bench/memory.py
  --soak` measures the growth per 1000 requests over minutes);
* it still answers, the log has no ERROR or traceback, and SIGTERM ends it with exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from api_helpers import metric, wait_until
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from server.testing import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_RUNNING, MAX_WAITING = 6, 6
DURATION, WARMUP = 25.0, 8.0  # seconds of load; memory is compared from the end of the warm-up
WORKERS, BURST, BURST_EVERY = 8, 32, 6.0  # a burst overflows running + waiting: 503s
ENDS = ("stop", "length", "repetition")  # a request's own ends (OpenAI's: stop and length)
EARLY_MARGIN = 3  # with 1-2 sentences to come the engine may finish before it sees the cancel
RSS_TRIPWIRE_MB = 150.0  # ~0.4 MB a request here: every request's state kept alive
SERVER_ARGS = [
    "--api-key", KEY, "--device", "cpu", "--log-level", "warning",
    "--max-running", str(MAX_RUNNING), "--max-waiting", str(MAX_WAITING),
    "--max-sentences-limit", "16", "--max-prompt-sentences", "32",
    "--encoder-cache-size", "1000", "--keepalive-interval", "1", "--shutdown-grace", "3",
]  # fmt: skip
ROUTES = {"gen": "/generate", "sum": "/summarize", "cmpl": "/v1/completions"}
ROUTES["chat"] = "/v1/chat/completions"
WORDS = "the cat dog sun moon river city night music garden train story runs sleeps sings".split()
IDLE = ("num_requests_running", "num_requests_waiting", "cache_reserved_bytes", "decoder_rows")
BAD = (  # (raw body, headers, status): a few kinds; test_api.py checks each one's details
    (b'{"prompt": "Hi.", ', {**AUTH, "Content-Type": "application/json"}, 400),
    (b'{"prompt": "Hi."}', {"Content-Type": "application/json"}, 401),
    (b'{"prompt": "Hi."}', {**AUTH, "Content-Type": "text/plain"}, 415),
)


def text(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choices(WORDS, k=5)).capitalize() + "." for _ in range(n))


@dataclass
class Record:
    kind: str
    status: int | None = None
    outcome: str = ""  # completed, rejected, disconnected, closed_after_final, bad_ok, error
    finish: str | None = None  # finish_reason the client received
    left: int = 0  # sentences still to come when the client left
    problems: list[str] = field(default_factory=list)


def body_for(kind: str, rng: random.Random, drop: bool) -> tuple[dict[str, Any], int]:
    """A well-formed request of `kind` (e.g. "chat_stream") and its max_sentences."""
    limit = rng.randint(4, 8) if drop else rng.randint(1, 6)
    p: dict[str, Any] = {"max_tokens": 32, "max_sentences": limit, "stream": "stream" in kind}
    if drop:
        p["eos_threshold"] = 1.0  # it ends by itself only at max_sentences
    if kind.startswith("sum"):  # num_sentences is its max_sentences unless a larger one is set
        n = min(limit, 3)
        if not drop:
            del p["max_sentences"]
        return {"document": text(rng, 4), "num_sentences": n, **p}, limit if drop else n
    if kind.startswith("chat"):
        return {"messages": [{"role": "user", "content": text(rng, 2)}], **p}, limit
    return {"prompt": text(rng, 2), **p}, limit


class Load:
    def __init__(self, url: str, seed: int = 0) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.records: list[Record] = []
        self.bad = itertools.cycle(BAD)
        self.clock = asyncio.get_running_loop().time
        self.t0 = self.clock()

    def now(self) -> float:
        return self.clock() - self.t0

    async def generation(self, client: httpx.AsyncClient, kind: str, drop: bool) -> Record:
        rng = random.Random(self.rng.random())
        body, limit = body_for(kind, rng, drop)
        rec = Record(kind)
        self.records.append(rec)
        url = self.url + ROUTES[kind.split("_")[0]]
        try:
            if body["stream"]:
                leave = rng.randint(0, limit + 1) if drop else None  # limit + 1: after the end
                await self.stream(client, rec, url, body, limit, leave)
            else:
                r = await client.post(url, json=body, headers=AUTH)
                self.answer(rec, r, limit)
        except httpx.HTTPError as e:
            rec.outcome = "error"
            rec.problems.append(f"transport error: {e!r}")
        return rec

    def answer(self, rec: Record, r: httpx.Response, limit: int) -> None:
        rec.status = r.status_code
        if r.status_code == 503:
            rec.outcome = "rejected"
            if not r.headers.get("retry-after", "").isdigit() or "error" not in r.json():
                rec.problems.append(f"503 without Retry-After or envelope: {r.text[:200]}")
        elif r.status_code != 200:
            rec.outcome = "error"
            rec.problems.append(f"status {r.status_code}: {r.text[:200]}")
        else:
            data = r.json()
            if "choices" in data:
                n, rec.finish = (
                    data["usage"]["completion_tokens"],
                    data["choices"][0]["finish_reason"],
                )
            else:
                n, rec.finish = len(data["sentences"]), data["finish_reason"]
            rec.outcome = "completed"
            self.check_end(rec, n, limit)

    def check_end(self, rec: Record, n: int, limit: int) -> None:
        if rec.finish not in ENDS or not 0 < n <= limit:
            rec.problems.append(f"{n} sentences of {limit}, finish {rec.finish!r}")
        elif rec.finish == "length" and n != limit:
            rec.problems.append(f"length after {n} of {limit} sentences")

    async def stream(
        self,
        client: httpx.AsyncClient,
        rec: Record,
        url: str,
        body: dict,
        limit: int,
        leave: int | None,
    ) -> None:
        openai = "/v1/" in url
        async with aconnect_sse(client, "POST", url, json=body, headers=AUTH) as events:
            if events.response.status_code != 200:
                await events.response.aread()
                return self.answer(rec, events.response, limit)
            rec.status = 200
            got: list[str] = []  # "s" a sentence, "f" the final event, "d" [DONE], "?" other
            if leave == 0:
                rec.outcome, rec.left = "disconnected", limit
                return  # right after the headers: queued or running
            async for sse in events.aiter_sse():
                got.append(self.event(rec, sse.event, sse.data, openai, got.count("s")))
                if leave is not None and "f" in got:
                    break  # planned to leave after more sentences than came: leave now
                if leave is not None and got.count("s") >= leave:
                    rec.outcome, rec.left = "disconnected", limit - got.count("s")
                    return  # the client leaves before the final event
            n = got.count("s")
            want = ["s"] * n + ["f"] + (["d"] if openai and leave is None else [])
            if got != want:
                rec.problems.append(f"events {''.join(got)}")
            rec.outcome = "completed" if leave is None else "closed_after_final"
            self.check_end(rec, n, limit)

    @staticmethod
    def event(rec: Record, event: str, raw: str, openai: bool, index: int) -> str:
        """What one SSE message is: "s", "f", "d" or "?" (see `stream`)."""
        if openai and raw == "[DONE]":
            return "d"
        data = json.loads(raw)
        if openai and "choices" in data:
            rec.finish = data["choices"][0]["finish_reason"]
            return "s" if rec.finish is None else "f"
        if not openai and event == "sentence":
            return "s" if data["index"] == index else "?"
        if not openai and event == "done":
            rec.finish = data["finish_reason"]
            return "f"
        rec.problems.append(f"event {event}: {raw[:200]}")
        return "?"

    async def bad_request(self, client: httpx.AsyncClient) -> None:
        raw, headers, status = next(self.bad)
        rec = Record("bad")
        self.records.append(rec)
        r = await client.post(self.url + "/generate", content=raw, headers=headers)
        rec.status = r.status_code
        rec.outcome = "bad_ok" if r.status_code == status and "error" in r.json() else "error"

    async def worker(self, client: httpx.AsyncClient) -> None:
        kinds = [f"{r}_{m}" for r in ROUTES for m in ("json", "stream", "stream")]
        while self.now() < DURATION:
            if self.rng.random() < 0.1:
                await self.bad_request(client)
                continue
            kind = self.rng.choice(kinds)
            rec = await self.generation(client, kind, "stream" in kind and self.rng.random() < 0.2)
            if rec.outcome == "rejected":
                await asyncio.sleep(self.rng.uniform(0.3, 1.0))  # a client obeying Retry-After

    async def bursts(self, client: httpx.AsyncClient) -> None:
        kinds = [f"{r}_{m}" for r in ROUTES for m in ("json", "stream")]
        for n in range(1, int(DURATION / BURST_EVERY)):
            await asyncio.sleep(n * BURST_EVERY - self.now())  # the schedule: the workload
            await asyncio.gather(
                *(self.generation(client, self.rng.choice(kinds), False) for _ in range(BURST))
            )


async def run_load(url: str, rss: list[tuple[float, float]], ps: psutil.Process) -> Load:
    """The load, with the server's resident memory sampled every 0.5 s as (seconds, MB)."""
    limits = httpx.Limits(max_connections=WORKERS + BURST + 8)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        load = Load(url)
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                rss.append((load.now(), ps.memory_info().rss / 2**20))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.5)  # the sampling period

        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(load.bursts(client), *(load.worker(client) for _ in range(WORKERS)))
        done.set()
        await sampler
    return load


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("soak") / "server.log"
    with ServerProcess(["--model", str(bundle_dir), *SERVER_ARGS], log) as server:
        server.wait_ready(180.0)
        yield server


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def test_mixed_bursty_load_with_disconnects(server: ServerProcess) -> None:
    before = metrics(server)
    rss: list[tuple[float, float]] = []
    load = asyncio.run(run_load(server.url, rss, psutil.Process(server.pid)))
    recs = load.records

    problems = [f"{r.kind} {r.status} {r.outcome}: {p}" for r in recs for p in r.problems]
    assert not problems, problems[:20]
    outcomes = Counter(r.outcome for r in recs)
    assert set(outcomes) <= {
        "completed",
        "rejected",
        "disconnected",
        "closed_after_final",
        "bad_ok",
    }
    assert outcomes["rejected"] > 0 and outcomes["completed"] > 20  # bursts reached the 503 path
    assert outcomes["bad_ok"] > 0
    assert {r.kind for r in recs if r.outcome == "completed"} >= {f"{k}_stream" for k in ROUTES}

    def idle() -> bool:
        now = metrics(server)
        return not any(metric(now, f"sonar_llm_{g}") for g in IDLE) and not metric(
            now, "sonar_llm_cache_bytes"
        )

    wait_until(idle, 30, "the engine to go idle with nothing held")
    after = metrics(server)
    fives = [
        s.labels
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.name == "sonar_llm_requests_total" and s.labels["status"][0] == "5" and s.value
    ]
    assert all(labels["status"] == "503" for labels in fives), fives

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    fin = {
        x: delta("sonar_llm_requests_finished_total", finish_reason=x)
        for x in (*ENDS, "cancelled", "timeout", "error")
    }
    admitted = [r for r in recs if r.kind != "bad" and r.status == 200]
    gone = [r for r in admitted if r.outcome == "disconnected"]
    early = [r for r in gone if r.left >= EARLY_MARGIN]
    seen = sum(r.outcome in ("completed", "closed_after_final") for r in admitted)
    anyway = sum(fin[x] for x in ENDS) - seen
    assert early, "no stream left early: the cancellation sums below would prove nothing"
    assert sum(fin.values()) == len(admitted), (fin, len(admitted))  # each ends exactly once
    cancelled = delta("sonar_llm_cancelled_total")
    assert cancelled == fin["cancelled"] == len(gone) - anyway, (cancelled, fin, len(gone))
    assert 0 <= anyway <= len(gone) - len(early), (anyway, len(gone), len(early))
    assert fin["timeout"] == fin["error"] == 0, fin

    warm = [mb for t, mb in rss if t >= WARMUP]
    assert warm and max(warm) - warm[0] < RSS_TRIPWIRE_MB, (warm[0], max(warm))


def test_still_answers_then_sigterm_exits_cleanly(server: ServerProcess) -> None:
    """Runs after the load (tests run in file order): the server is as good as new."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        assert client.get("/health/ready").status_code == 200
        body = {"prompt": "Hello there.", "max_tokens": 24, "stream": False}
        r = client.post("/generate", json=body)
        assert r.status_code == 200 and r.json()["sentences"], r.text
    assert server.stop(grace=30) == 0
    log = server.log_path.read_text(errors="replace").splitlines()
    assert not [ln for ln in log if " ERROR " in ln or "Traceback" in ln], log[-40:]
