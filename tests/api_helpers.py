"""Helpers for the HTTP tests (tests/server): apps on one loaded bundle, in-process or on a socket.

`ready_client(app)` enters a TestClient's lifespan and waits for readiness; `start_live(pipe)`
serves an app with real uvicorn on 127.0.0.1 in a background thread, for what needs real
connections (SSE clients, disconnects, the openai client). Apps are built with `pipe=`, so the
model loads once per session.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from models.pipeline import SonarLLMPipeline
from server.api.app import create_app
from server.api.state import AppState
from server.main import DrainingServer, uvicorn_config
from server.settings import Settings

READY_TIMEOUT = 60.0  # the machine is shared with benchmarks: generous, never asserted on
# Small generation settings keep the suite fast on a 2-core CPU.
FAST = {"max_tokens": 32}
# A request that runs until it is cancelled: many short sentences, and EOS never matches, so
# the engine notices a cancellation within one short sentence step.
ENDLESS = {"max_sentences": 256, "max_tokens": 24, "eos_threshold": 1.0}


class Reply(Protocol):
    """An HTTP response: httpx's, or the TestClient's (Starlette's, which may be another httpx)."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def metric(text: str, sample: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent), from /metrics text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def error_of(response: Reply) -> dict[str, Any]:
    """The error envelope's inner object, checking the envelope's shape on the way."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


class _ArgsOnly(Settings):
    """Settings from arguments alone: SONAR_LLM_* variables in the environment play no part."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings(**overrides: Any) -> Settings:
    # A test app never reaches for nltk's real data index (tests/models/test_punkt_data.py
    # serves one locally); without punkt_tab it splits with the fallback.
    overrides.setdefault("punkt_url", "")
    return _ArgsOnly(**overrides)


@dataclass
class Live:
    """A real uvicorn server on 127.0.0.1, serving `app` from a background thread."""

    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> AppState:
        return self.app.state.sonar  # type: ignore[no-any-return]

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(60.0, connect=10.0))
        return httpx.Client(base_url=self.url, **kwargs)

    def metrics(self) -> str:
        with self.client() as c:
            r = c.get("/metrics")
        assert r.status_code == 200
        return r.text

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def _wait_ready(get: Callable[[str], Reply], state: AppState) -> None:
    def ready() -> bool:
        if state.status == "failed":
            raise AssertionError(f"bring-up failed: {state.detail}")
        return get("/health/ready").status_code == 200

    wait_until(ready, READY_TIMEOUT, "/health/ready to answer 200")


def start_live(pipe: SonarLLMPipeline, *, draining: bool = False, **overrides: Any) -> Live:
    """Serve a new app; `draining`: with `sonar-llm serve`'s server class and shutdown timeout."""
    app = create_app(settings(**overrides), pipe=pipe)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    grace = max(1, int(app.state.sonar.settings.shutdown_grace)) if draining else 3
    config = uvicorn_config(
        app, app.state.sonar.settings, timeout_graceful_shutdown=grace, access_log=False
    )
    server = DrainingServer(config, app.state.sonar) if draining else uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    live = Live(app, server, thread, port)
    try:
        wait_until(lambda: server.started, READY_TIMEOUT, "uvicorn to start")
        with live.client() as c:
            _wait_ready(c.get, live.state)
    except BaseException:
        live.stop()
        raise
    return live


@contextlib.contextmanager
def ready_client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient with the app's lifespan entered, once /health/ready answers 200."""
    with TestClient(app, raise_server_exceptions=False) as client:
        _wait_ready(client.get, app.state.sonar)
        yield client


def break_running_decodes(state: AppState) -> int:
    """Make every running request's next SONAR decode fail for real (fault injection).

    Sets the decoder's token bound to 1 on the requests' own (validated, frozen) options, which
    fairseq2 then refuses: the real decode raises inside the engine, between two sentences.
    No input passes validation and fails like this, so the test reaches past validation.
    """
    engine = state.engine
    assert engine is not None
    seqs = [w for w in engine.scheduler.running if hasattr(w, "options")]
    for seq in seqs:
        object.__setattr__(seq.options.decode, "max_tokens", 1)
    return len(seqs)
