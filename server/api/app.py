"""The FastAPI application: routers, middleware, error envelope, and model bring-up.

`create_app(settings)` returns at once; the model loads in the background while
`/health/live` answers 200 and `/health/ready` 503, so orchestrators can tell "starting" from
"dead".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount, Route

from models.asset_errors import SonarAssetError
from models.checkpoint import CheckpointError
from models.config import ConfigError
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.api import (
    contract,
    routes_embeddings,
    routes_generate,
    routes_health,
    routes_openai,
    routes_sonar,
)
from server.api.errors import install_handlers
from server.api.middleware import (
    OPEN_PATHS,
    PLAYGROUND,
    APIKeyGuard,
    BodyGuard,
    BrowserRedirect,
    RequestContext,
)
from server.api.routes_health import package_version
from server.api.state import AppState
from server.engine import Engine, FinalEvent, GenerationRequest
from server.settings import Settings, engine_config

log = logging.getLogger("sonar_llm.server")
# Failures to load that the user fixes (what to download, a wrong path or card name).
LOAD_ERRORS = (SonarAssetError, CheckpointError, ConfigError, FileNotFoundError)
STATIC_DIR = Path(__file__).parent / "static"  # the playground: plain files, no build step

DESCRIPTION = """Serve SONAR-LLM: a language model that predicts the next sentence's SONAR
embedding, decoded into text by Meta's SONAR decoder. Sentences stream as Server-Sent Events.
Errors use one envelope: `{"error": {"message", "type", "param", "code"}}`."""


def model_name(settings: Settings) -> str:
    if settings.model is None:
        return "sonar-llm-demo"
    model = settings.model.rstrip("/")
    return model if "/" in model and not Path(model).exists() else Path(model).name


async def _warm_up(engine: Engine) -> None:
    """One short generation, so the first user request does not pay for lazy initialisation."""
    opts = GenerationOptions(max_sentences=1, decode=DecodeOptions(max_tokens=16))
    request = GenerationRequest("Hello world.", opts, request_id="warm-up")
    stream = await engine.submit(engine.prepare(request))
    async for event in stream:
        if isinstance(event, FinalEvent) and event.finish_reason == "error":
            raise RuntimeError(f"warm-up failed: {event.error}")


async def _bring_up(state: AppState, pipe: SonarLLMPipeline | None) -> None:
    s = state.settings
    try:
        if pipe is None:
            pipe = await asyncio.to_thread(
                SonarLLMPipeline.from_options, s, lambda msg: log.info("loading: %s", msg)
            )
        state.pipe = pipe
        state.model_name = model_name(s)
        state.http_metrics.model.info(
            {
                "model": state.model_name,
                "format": pipe.report.format,
                "device": str(pipe.model.device),
                "dtype": str(pipe.model.dtype).removeprefix("torch."),
                "demo": str(pipe.demo).lower(),
            }
        )
        engine = Engine(
            pipe, engine_config(s), registry=state.registry, metrics=state.engine_metrics
        )
        engine.start()
        state.engine = engine
        if s.warmup:
            state.status = "warming"
            log.info("loading: warming up (one short generation) ...")
            started = time.perf_counter()
            await _warm_up(engine)
            log.info("loading: ... warm-up done in %.1f s", time.perf_counter() - started)
        if state.status != "draining":
            state.status = "ok"
            log.info("ready: serving %s", state.model_name)
    except LOAD_ERRORS as e:  # the user's to fix: one line, as `sonar-llm generate` says it
        log.error("model bring-up failed: %s", e)
        state.status, state.detail = "failed", str(e)
        if state.on_fatal is not None:
            state.on_fatal(str(e))
    except Exception as e:
        log.exception("model bring-up failed")
        state.status, state.detail = "failed", str(e)
        if state.on_fatal is not None:
            state.on_fatal(str(e))


def _published_schema(app: FastAPI) -> None:
    """The contract as clients meet it: 400 (not FastAPI's 422) for invalid fields, each event
    stream's events typed, and the API-key scheme on every route behind it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            contract.add_event_schemas(schema)
            contract.add_security(schema, OPEN_PATHS)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None, *, pipe: SonarLLMPipeline | None = None
) -> FastAPI:
    """The app; `pipe` skips loading (tests share one loaded bundle)."""
    settings = settings or Settings()
    state = AppState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.status, state.detail = "loading", None
        task = asyncio.create_task(_bring_up(state, pipe))
        try:
            yield
        finally:
            if state.status != "failed":
                state.status = "draining"
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(
        title="sonar-llm-server",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.sonar = state
    install_handlers(app)
    _published_schema(app)
    modules = (routes_generate, routes_openai, routes_embeddings, routes_sonar, routes_health)
    for module in modules:
        app.include_router(module.router)
    # A mount is no route of the API: the contract leaves it out. `/playground` redirects here.
    app.mount(PLAYGROUND.rstrip("/"), StaticFiles(directory=STATIC_DIR, html=True), "playground")
    # add_middleware wraps: the last added is outermost.
    app.add_middleware(BodyGuard, state=state)
    app.add_middleware(APIKeyGuard, state=state)
    app.add_middleware(BrowserRedirect)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-Id"],
            expose_headers=["X-Request-Id", "X-Replica-Id", "Retry-After"],
        )
    # Every route by itself (the app may list included routers as one entry each), so that
    # answers given before routing (413, 415, 401) are counted under their route.
    routes = [r for m in modules for r in m.router.routes]
    routes += [r for r in app.routes if isinstance(r, Route | Mount)]
    app.add_middleware(RequestContext, state=state, routes=routes)
    return app
