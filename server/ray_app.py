"""The server as a Ray Serve application: one engine per replica, the same FastAPI routes.

Each replica builds the app with `create_app(settings)` and serves it through Serve's ingress
(streaming included). Serve routes a request only to a replica with room
(`max_ongoing_requests = max_running + max_waiting`), restarts a replica whose engine loop died
(`check_health`), and drains one for `shutdown_grace` seconds before stopping it.

    serve run server.ray_app:build_app model=raxtemur/sonar-llm-900m replicas=2
    serve deploy docker/ray-serve.yaml
    sonar-llm ray --model raxtemur/sonar-llm-900m --replicas 2

Ray is imported lazily: the rest of the server runs without it installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.app import create_app
from server.api.state import AppState
from server.settings import Settings

log = logging.getLogger("sonar_llm.ray")

DEPLOYMENT = "SonarLLM"
# How often a replica copies its Prometheus samples into Ray's metrics export.
METRICS_EXPORT_INTERVAL_S = 5.0


class ScaleOptions(BaseModel):
    """How many replicas, and what each one takes from the cluster. One field per option:
    the builder's key=value args and the `sonar-llm ray` flags derive from it."""

    model_config = ConfigDict(extra="forbid")

    replicas: int | None = Field(None, ge=1, description="fixed number of replicas (default 1)")
    min_replicas: int | None = Field(
        None, ge=0, description="autoscaling: fewest replicas (enables autoscaling)"
    )
    max_replicas: int | None = Field(
        None, ge=1, description="autoscaling: most replicas (enables autoscaling)"
    )
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="autoscaling: ongoing requests per replica to aim for (default max_running)",
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="autoscaling: load held before adding")
    downscale_delay_s: float = Field(120.0, ge=0, description="autoscaling: idle before removing")
    look_back_period_s: float = Field(
        30.0, gt=0, description="autoscaling: window the ongoing requests are averaged over"
    )
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per replica (default 1 when the device is cuda or the cluster has "
        "GPUs, else 0)",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica")
    health_check_period_s: float = Field(10.0, gt=0, description="engine health check interval")

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> ScaleOptions:
        autoscale = self.min_replicas is not None or self.max_replicas is not None
        if autoscale and self.replicas is not None:
            raise ValueError("give either replicas or min_replicas/max_replicas, not both")
        lo, hi = self.min_replicas or 1, self.max_replicas
        if hi is not None and lo > hi:
            raise ValueError(f"min_replicas ({lo}) exceeds max_replicas ({hi})")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


def _cluster_has_gpus() -> bool:
    import ray

    if ray.is_initialized():
        return bool(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.is_available()


def deployment_options(settings: Settings, scale: ScaleOptions) -> dict[str, Any]:
    """Serve's deployment options, derived from the server settings and the scale options."""
    if scale.num_gpus is not None:
        gpus = scale.num_gpus
    elif settings.device is not None:
        gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    else:
        gpus = 1.0 if _cluster_has_gpus() else 0.0
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        # The engine runs max_running together and queues max_waiting more; Serve's router
        # sends a replica no more than that, so work goes to replicas with room.
        "max_ongoing_requests": settings.max_running + settings.max_waiting,
        "graceful_shutdown_timeout_s": settings.shutdown_grace,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": scale.health_check_period_s,
        "health_check_timeout_s": max(30.0, scale.health_check_period_s),
        "ray_actor_options": {"num_cpus": scale.num_cpus, "num_gpus": gpus},
    }
    if scale.autoscaling:
        lo = scale.min_replicas if scale.min_replicas is not None else 1
        hi = scale.max_replicas if scale.max_replicas is not None else max(lo, 1)
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "initial_replicas": max(lo, 1),
            "max_replicas": hi,
            "target_ongoing_requests": scale.target_ongoing_requests or settings.max_running,
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "look_back_period_s": scale.look_back_period_s,
        }
    else:
        options["num_replicas"] = scale.replicas or 1
    return options


def health_problem(state: AppState) -> str | None:
    """Why this replica should be restarted, or None. Draining is not a fault."""
    if state.status == "failed":
        return f"model bring-up failed: {state.detail}"
    if state.status == "draining":
        return None
    engine = state.engine
    if engine is None:
        return "no engine" if state.status == "ok" else None
    if not engine.alive:
        return f"engine loop died: {engine.error}"
    return None


class RayMetricsBridge:
    """Copies this replica's Prometheus samples into Ray's metrics export.

    Ray tags each with `deployment`, `replica` and `application`, and each node's metrics agent
    serves them to Prometheus (names prefixed `ray_`): the fleet's engine metrics, per replica.
    Every sample becomes a gauge of the same name (counters stay monotonic, so `rate()` works).
    """

    def __init__(self, registry: CollectorRegistry, interval: float = METRICS_EXPORT_INTERVAL_S):
        self.registry = registry
        self.interval = interval
        self._gauges: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def export_once(self) -> None:
        from ray.serve.metrics import Gauge

        for family in self.registry.collect():
            if family.name == "target":
                continue  # target_info: Ray's own tags say which replica this is
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(
                        sample.name,
                        description=family.documentation or sample.name,
                        tag_keys=tuple(sorted(sample.labels)),  # type: ignore[arg-type]
                    )
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels) or None)  # type: ignore[arg-type]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.export_once()
            except Exception:  # metrics must never take the replica down
                log.exception("exporting metrics to Ray failed")


def _wait_until_ready(app: FastAPI, on_ready: Callable[[AppState], Callable[[], None]]) -> None:
    """Make the app's lifespan startup return only once the model is loaded and warmed up.

    Serve runs an ingress app's lifespan when the replica starts and routes to the replica
    once that returns, so a replica joins the pool ready, and one that cannot load fails to
    start (Serve retries it) instead of answering 503 forever.
    """
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with inner(a) as value:
            state: AppState = a.state.sonar
            while state.status in ("loading", "warming"):
                await asyncio.sleep(0.05)
            if state.status == "failed":
                raise RuntimeError(f"model bring-up failed: {state.detail}")
            stop = on_ready(state)
            try:
                yield value
            finally:
                stop()

    app.router.lifespan_context = lifespan


def replica_app(settings: Settings, replica_id: str, *, export_metrics: bool = True) -> FastAPI:
    """The server's app as one replica serves it: named in headers, /info and /metrics."""
    app = create_app(settings)
    state: AppState = app.state.sonar
    state.replica_id = replica_id
    # /metrics through the proxy is one replica's: say which (OpenMetrics target_info).
    state.registry.set_target_info({"replica": replica_id})

    def on_ready(state: AppState) -> Callable[[], None]:
        if not export_metrics:
            return lambda: None
        bridge = RayMetricsBridge(state.registry)
        bridge.start()
        return bridge.stop

    _wait_until_ready(app, on_ready)
    return app


class SonarLLMReplica:
    """The replica class Serve wraps with the app's ingress; it adds the health check."""

    app: FastAPI  # set by Serve's ingress wrapper

    def check_health(self) -> None:
        problem = health_problem(self.app.state.sonar)
        if problem is not None:
            raise RuntimeError(problem)


def build(settings: Settings, scale: ScaleOptions | None = None) -> Any:
    """The Serve application (a bound deployment) for these settings."""
    from ray import serve

    scale = scale or ScaleOptions()

    def make_app() -> FastAPI:  # runs in each replica
        from server.log_config import configure_logging

        configure_logging(settings.log_format, settings.log_level)
        context = serve.get_replica_context()
        return replica_app(settings, context.replica_tag)

    ingress = serve.ingress(make_app)(SonarLLMReplica)
    deployment = serve.deployment(ingress, **deployment_options(settings, scale))
    return deployment.bind()  # type: ignore[attr-defined]


def split_args(args: dict[str, Any]) -> tuple[Settings, ScaleOptions]:
    """Builder args (`key=value`, keys named like settings or scale options) -> both objects.

    Settings not given come from `SONAR_LLM_*` variables, as for `sonar-llm serve`."""
    given = {k.replace("-", "_"): v for k, v in args.items()}
    unknown = set(given) - set(Settings.model_fields) - set(ScaleOptions.model_fields)
    if unknown:
        known = sorted({*Settings.model_fields, *ScaleOptions.model_fields})
        raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: {', '.join(known)}")
    settings = Settings(**{k: v for k, v in given.items() if k in Settings.model_fields})
    scale = ScaleOptions(**{k: v for k, v in given.items() if k in ScaleOptions.model_fields})
    return settings, scale


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder: `serve run server.ray_app:build_app key=value ...`, or
    `import_path` + `args` in a Serve config file (`serve deploy`)."""
    settings, scale = split_args(args)
    return build(settings, scale)


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """One flag per scale option (`--min-replicas` for `min_replicas`)."""
    group = parser.add_argument_group("replicas")
    for name, field in ScaleOptions.model_fields.items():
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, help=field.description
        )


def scale_from_args(args: argparse.Namespace) -> ScaleOptions:
    given = {k: v for k, v in vars(args).items() if k in ScaleOptions.model_fields}
    return ScaleOptions(**{k: v for k, v in given.items() if v is not None})
