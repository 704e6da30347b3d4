"""What the HTTP layer holds: settings, the engine once loaded, readiness, HTTP metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram, Info

from models.pipeline import SonarLLMPipeline
from server.api.errors import APIError
from server.engine import Engine
from server.engine.metrics import LATENCY_BUCKETS, EngineMetrics
from server.settings import Settings

Status = Literal["loading", "warming", "ok", "draining", "failed"]


class HTTPMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sonar_llm_requests",
            "HTTP requests by route template and status",
            ("route", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "sonar_llm_request_duration_seconds",
            "HTTP request duration (streams: until the last byte)",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model = Info("sonar_llm_model", "The served model", registry=registry)


@dataclass
class AppState:
    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    status: Status = "loading"
    detail: str | None = None
    pipe: SonarLLMPipeline | None = None
    engine: Engine | None = None
    model_name: str = "sonar-llm"
    active_requests: int = 0  # generation requests in flight over HTTP (drain waits for them)
    on_fatal: Callable[[str], None] | None = None
    replica_id: str | None = None  # set when a Ray Serve replica serves the app
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.http_metrics = HTTPMetrics(self.registry)
        # Owned here, not by the engine: a restarted lifespan builds a new engine, same metrics.
        self.engine_metrics = EngineMetrics(self.registry)

    @property
    def ready(self) -> bool:
        return self.status == "ok" and self.engine is not None and self.engine.alive

    def require_engine(self) -> Engine:
        """The engine, or a 503 saying why there is none to use right now."""
        if self.status == "draining":
            raise APIError(
                503, "Server is shutting down", code="draining", headers={"Retry-After": "5"}
            )
        if self.engine is None or not self.engine.alive:
            message = {
                "loading": "Model is loading",
                "failed": f"Model failed to load: {self.detail}",
            }.get(self.status, "The generation engine is not running")
            raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
        return self.engine
