"""Fixtures for the HTTP tests: `api(**settings)` (in-process) and `live(**settings)` (uvicorn)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_helpers import Live, ready_client, settings, start_live
from fastapi.testclient import TestClient

from models.pipeline import SonarLLMPipeline
from server.api.app import create_app


@pytest.fixture
def live(pipe: SonarLLMPipeline) -> Iterator[Callable[..., Live]]:
    """`live(**settings)`: a started, ready uvicorn server; stopped after the test."""
    started: list[Live] = []

    def make(**overrides: Any) -> Live:
        server = start_live(pipe, **overrides)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def api(pipe: SonarLLMPipeline) -> Iterator[Callable[..., TestClient]]:
    """`api(**settings)`: an in-process TestClient, lifespan entered and the model ready."""
    with contextlib.ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            app = create_app(settings(**overrides), pipe=pipe)
            return stack.enter_context(ready_client(app))

        yield make
