"""`sonar-llm serve` as a process: JSON log lines carry the request id; SIGTERM drains.

One server process for the module (starting one loads torch and SONAR: slow on a shared CPU);
the drain test ends it, so it comes last.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_helpers import error_of, wait_until
from httpx_sse import EventSource

from models import tiny
from server.testing import ServerProcess

GRACE = 20
START_TIMEOUT = 180.0  # importing torch and loading SONAR on a busy 2-core machine


@dataclass
class Served:
    server: ServerProcess

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.server.proc is not None
        return self.server.proc

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(60.0, connect=10.0))
        return httpx.Client(base_url=self.server.url, **kwargs)

    def log(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (other output, e.g. warnings, skipped)."""
        entries = []
        for line in self.server.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entries.append(json.loads(line))
        return entries


@pytest.fixture(scope="module")
def served(bundle: tiny.Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--model", str(bundle.root), "--device", "cpu", "--shutdown-grace", str(GRACE)]
    with ServerProcess([*args, "--log-format", "json"], log_path) as server:
        server.wait_ready(START_TIMEOUT)
        yield Served(server)


def test_starting_server_is_live_but_not_ready(served: Served) -> None:
    """While the model loads, readiness says so (503 + Retry-After), never an error page."""
    for r in served.server.not_ready:
        assert r.status_code == 503
        assert r.json()["status"] in ("loading", "warming")
        assert r.headers["retry-after"]


def test_request_id_is_in_the_json_log_lines(served: Served) -> None:
    with served.client() as c:
        r = c.post(
            "/generate",
            json={"prompt": "Hello there.", "max_sentences": 1, "max_tokens": 24},
            headers={"X-Request-Id": "live-trace-7"},
        )
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "live-trace-7"
        generated = c.get("/info").headers["x-request-id"]

    def logged(rid: str) -> list[dict[str, Any]]:
        return [e for e in served.log() if e.get("request_id") == rid]

    wait_until(lambda: bool(logged("live-trace-7")) and bool(logged(generated)), 30, "log lines")
    (access,) = [e for e in logged("live-trace-7") if e["logger"] == "uvicorn.access"]
    assert "POST /generate" in access["message"] and "200" in access["message"]
    assert set(access) >= {"time", "level", "logger", "request_id", "message"}
    assert any("GET /info" in e["message"] for e in logged(generated))


def test_sigterm_drains_in_flight_streams_then_exits_0(served: Served) -> None:
    proc = served.proc
    request = {
        "prompt": "The cat runs home. It is late.",
        "stream": True,
        "max_sentences": 10,
        "max_tokens": 64,
        "eos_threshold": 1.0,
    }
    with served.client() as client, client.stream("POST", "/generate", json=request) as r:
        assert r.status_code == 200
        events = EventSource(r).iter_sse()
        first = next(events)
        assert first.event == "sentence"

        proc.send_signal(signal.SIGTERM)
        with served.client() as other:
            # Draining: not ready (the listener stays open), new work refused, still live.
            def draining() -> bool:
                ready = other.get("/health/ready")
                return ready.status_code == 503 and ready.json()["status"] == "draining"

            wait_until(draining, 10, "readiness to report draining")
            assert other.get("/health/ready").headers["retry-after"]
            assert other.get("/health/live").status_code == 200
            refused = other.post("/generate", json={"prompt": "Hi.", "max_tokens": 24})
            assert refused.status_code == 503
            assert error_of(refused)["code"] == "draining"
            assert refused.headers["retry-after"]

        # The request that was in flight finishes normally.
        rest = [(sse.event, sse.json()) for sse in events]
    names = [name for name, _ in rest]
    assert names == ["sentence"] * 9 + ["done"]
    done = rest[-1][1]
    assert done["finish_reason"] == "length"
    assert len(done["sentences"]) == 10
    assert done["sentences"][0] == first.json()["text"]

    assert proc.wait(GRACE + 30) == 0
    messages = [e["message"] for e in served.log()]
    assert any("draining" in m for m in messages)
