"""Liveness, readiness, Prometheus metrics, and what is being served."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.sentences import splitter_name
from server.api.schemas import CacheMemory, ErrorResponse, Health, Info
from server.api.state import AppState
from server.connections import connection_cap

router = APIRouter(tags=["health"])


def package_version() -> str:
    try:
        return version("sonar-llm-server")
    except PackageNotFoundError:
        return "unknown"


@router.get("/health/live", response_model=Health)
async def live() -> Health:
    """200 as long as the process serves HTTP."""
    return Health(status="ok")


@router.get(
    "/health/ready",
    response_model=Health,
    responses={503: {"model": Health, "description": "loading, warming, draining or failed"}},
)
async def ready(request: Request) -> Response:
    """200 when the model is loaded, warmed up and the engine runs; 503 otherwise."""
    state: AppState = request.app.state.sonar
    if state.ready:
        return JSONResponse(Health(status="ok").model_dump())
    status = "failed" if state.status == "ok" else state.status  # engine died after start
    detail = state.detail or (
        str(state.engine.error) if state.engine and state.engine.error else None
    )
    return JSONResponse(
        Health(status=status, detail=detail).model_dump(),
        status_code=503,
        headers={"Retry-After": "5"},
    )


# Bare /health (what many probes and load balancers ask for) answers as /health/ready.
router.add_api_route(
    "/health",
    ready,
    methods=["GET"],
    response_model=Health,
    responses={503: {"model": Health, "description": "loading, warming, draining or failed"}},
    summary="Ready (the same answer as /health/ready)",
)


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: this process's metrics (under Ray Serve, one replica's: its
    `target_info{replica}` and the X-Replica-Id header say which)."""
    state: AppState = request.app.state.sonar
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/info",
    response_model=Info,
    responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
        503: {"model": ErrorResponse, "description": "Not ready"},
    },
)
async def info(request: Request) -> Info:
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    pipe = engine.pipe
    cache = engine.runner.encoder_cache
    s = state.settings
    return Info(
        model=state.model_name,
        version=package_version(),
        demo=pipe.demo,
        checkpoint_format=pipe.report.format,
        device=str(pipe.model.device),
        dtype=str(pipe.model.dtype).removeprefix("torch."),
        embed_dim=pipe.model.config.embed_dim,
        splitter=splitter_name("eng_Latn"),  # type: ignore[arg-type]
        config=pipe.model.config.to_json_dict(),
        sonar={
            **dict(zip(("encoder", "decoder", "tokenizer"), pipe.codec.names, strict=True)),
            "backend": pipe.codec.backend,  # native or fairseq2
        },
        limits={
            "max_running": s.max_running,
            "max_waiting": s.max_waiting,
            "max_prefill_sentences": s.max_prefill_sentences,
            "max_encode_tokens": s.max_encode_tokens,
            "max_sentences": s.max_sentences_limit,
            "max_prompt_sentences": s.max_prompt_sentences,
            "max_body_bytes": s.max_body_bytes,
            "request_timeout": s.request_timeout,
            "read_timeout": s.read_timeout,
            "body_timeout": s.body_timeout,
            # The cap in force (the default is derived from the open-file limit); Ray Serve's
            # proxy, not this process, holds the connections of a replica.
            "max_connections": (
                connection_cap(s.max_connections) if state.replica_id is None else s.max_connections
            ),
        },
        encoder_cache={
            "size": len(cache),
            "capacity": cache.capacity,
            "hits": cache.hits,
            "misses": cache.misses,
        },
        cache_memory=CacheMemory(
            limit_bytes=engine.blocks.capacity_bytes,
            page_bytes=engine.blocks.page_bytes,
            pages=engine.blocks.num_pages,
            allocated_bytes=engine.cache_bytes(),
        ),
        replica=state.replica_id,
    )


# HEAD answers like GET without a body (uvicorn drops it; Content-Length stays), for probes and
# load balancers that check with HEAD. Left out of the published schema.
for _path, _endpoint in (
    ("/health/live", live),
    ("/health/ready", ready),
    ("/health", ready),
    ("/metrics", metrics),
    ("/info", info),
):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
