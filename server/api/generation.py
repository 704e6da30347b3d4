"""From a validated request to engine events and back: options, disconnect watching, SSE.

The routes only choose the prompt and the output shape; everything about running a request
(admission, the client leaving, keep-alive pings, in-band errors) is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from models.generate import GenerationError, GenerationOptions, Prompt
from models.options import OPTION
from server.api.errors import APIError, ClientGone, envelope, from_exception
from server.api.state import AppState
from server.engine import EventStream, FinalEvent, GenerationRequest, SentenceEvent
from server.settings import Settings

if TYPE_CHECKING:
    from server.engine.engine import Engine
    from server.engine.request import Request as EngineRequest

log = logging.getLogger("sonar_llm.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def build_options(
    limits: Settings, values: dict[str, Any], default_max_sentences: int | None = None
) -> GenerationOptions:
    """GenerationOptions within the server's limits from flat option values (None: unset);
    GenerationError names a bad field.

    `default_max_sentences` is what the client asked for in another field (/summarize's
    `num_sentences`); None means the generator's default, never above the server's limit.
    """
    values = dict(values)
    param = "max_sentences"
    if values.get("max_sentences") is None:
        if default_max_sentences is not None:
            values["max_sentences"], param = default_max_sentences, "num_sentences"
        else:
            default = OPTION["max_sentences"].default
            values["max_sentences"] = min(default, limits.max_sentences_limit)
    if values["max_sentences"] > limits.max_sentences_limit:
        raise GenerationError(
            param,
            f"must be at most {limits.max_sentences_limit} on this server, "
            f"got {values['max_sentences']}",
        )
    if values.get("top_p") == 1.0:
        values["top_p"] = None  # 1.0 keeps every token: the same as unset
    if (values.get("top_p") is not None or values.get("top_k") is not None) and not values.get(
        "temperature"
    ):
        raise GenerationError("temperature", "top_p/top_k need a temperature > 0 (sampling)")
    return GenerationOptions.from_values(values)


async def start(
    state: AppState,
    request: Request,
    prompt: Prompt | None,
    opts: GenerationOptions,
    timeout: float | None,
    return_embeddings: bool = False,
    prompt_embeddings: list[list[float]] | None = None,
    turns: bool = False,
) -> EventStream:
    """Admit a request into the engine (503 when not ready, draining or full); the engine's
    input processor checks, splits and caps it (see `server.engine.prepare`)."""
    engine = state.require_engine()
    gen = generation_request(
        state.settings,
        prompt,
        opts,
        timeout,
        request_id(request),
        return_embeddings,
        prompt_embeddings,
        turns,
    )
    return (await submit_all(engine, [gen]))[0]


async def submit_all(engine: Engine, requests: list[EngineRequest]) -> list[EventStream]:
    """Every request prepared (`Engine.prepare`: checked, split, capped), then all queued or
    none. Preparing runs on a worker thread: splitting a long prompt takes milliseconds the
    event loop's other streams would otherwise wait for. A bad field raises before anything is
    queued."""
    works = await asyncio.to_thread(lambda: [engine.prepare(r) for r in requests])
    return await engine.submit_all(works)


def generation_request(
    settings: Settings,
    prompt: Prompt | None,
    opts: GenerationOptions,
    timeout: float | None,
    request_id: str,
    return_embeddings: bool = False,
    prompt_embeddings: list[list[float]] | None = None,
    turns: bool = False,
) -> GenerationRequest:
    """The engine request for a prompt, for any caller (the HTTP routes and `sonar-llm batch`):
    the server's limits on the body; the engine's input processor does the rest."""
    if isinstance(prompt, str) and len(prompt) > settings.max_body_bytes:
        raise GenerationError("prompt", "is too long")
    return GenerationRequest(
        prompt_embeddings=prompt_embeddings,
        prompt=prompt,
        turns=turns,
        options=opts,
        timeout=_deadline(timeout, settings.request_timeout),
        return_embeddings=return_embeddings,
        request_id=request_id,
    )


def request_id(request: Request) -> str:
    """The X-Request-Id the middleware settled on (one is made if there is none)."""
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid else uuid.uuid4().hex


def _deadline(asked: float | None, server: float | None) -> float | None:
    """The request's own timeout, capped by the server's request_timeout (the smaller wins)."""
    if asked is None or server is None:
        return asked if server is None else server
    return min(asked, server)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(
    state: AppState, request: Request, stream: EventStream
) -> tuple[list[SentenceEvent], FinalEvent]:
    """All events of a non-streaming request; a client that leaves cancels the request.

    Raises ClientGone when the client left, APIError (500) when generation failed.
    """

    state.active_requests += 1
    work = asyncio.ensure_future(stream.collect())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientGone()
        events, final = work.result()
        if final.finish_reason == "error":
            raise APIError(500, final.error or "generation failed", code="generation_error")
        return events, final
    finally:
        for task in (work, watch):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await stream.aclose()
        state.active_requests -= 1


async def run_job(state: AppState, request: Request, stream: EventStream) -> FinalEvent:
    """A SONAR job's final event; the client leaving cancels it, a failure is a 500."""
    _, final = await collect(state, request, stream)
    check_job(final)
    return final


def check_job(final: FinalEvent) -> None:
    """A SONAR job that did not end with its answer: 500 (failed), 504 (deadline), 503."""
    if final.finish_reason == "error":
        raise APIError(500, final.error or "generation failed", code="generation_error")
    if final.finish_reason != "stop":
        raise APIError(
            504 if final.finish_reason == "timeout" else 503,
            f"the job ended early: {final.finish_reason}",
            code=final.finish_reason,
        )


class Source(Protocol):
    """Something events come from: one EventStream, or several merged (OpenAI choices)."""

    async def next(self, timeout: float) -> Any: ...  # None when idle; StopAsyncIteration: end

    async def aclose(self) -> None: ...


class Merged:
    """Several event streams as one: `next()` gives (index, event) in arrival order and ends
    when every stream has sent its final event; `aclose()` cancels those still running."""

    def __init__(self, streams: list[EventStream]) -> None:
        self.streams = streams
        self._queue: asyncio.Queue[tuple[int, SentenceEvent | FinalEvent]] = asyncio.Queue()
        self._left = len(streams)
        self._tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream: EventStream) -> None:
        async for event in stream:
            await self._queue.put((index, event))

    async def next(self, timeout: float) -> tuple[int, SentenceEvent | FinalEvent] | None:
        if self._left == 0:
            raise StopAsyncIteration
        try:
            index, event = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        if isinstance(event, FinalEvent):
            self._left -= 1
        return index, event

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            await stream.aclose()


def sse_response(
    state: AppState,
    stream: Source,
    render: Callable[[Any], list[ServerSentEvent]],
    openai_done: bool = False,
    closing: Callable[[], list[ServerSentEvent]] | None = None,
) -> EventSourceResponse:
    """Stream events as SSE with `: ping` while idle; errors after the start go in-band.

    `render` turns each event into SSE events; `closing` adds the last ones (OpenAI's usage
    chunk) before `data: [DONE]`.
    """
    interval = state.settings.keepalive_interval

    async def events() -> AsyncIterator[ServerSentEvent]:
        state.active_requests += 1
        try:
            while True:
                try:
                    event = await stream.next(interval)
                except StopAsyncIteration:
                    break
                if event is None:
                    yield ServerSentEvent(comment="ping")
                    continue
                for out in render(event):
                    yield out
            for out in closing() if closing is not None else []:
                yield out
            if openai_done:
                yield ServerSentEvent(data="[DONE]")
        except asyncio.CancelledError:
            raise  # the client left: sse-starlette cancels us; aclose below cancels the request
        except Exception as e:
            log.exception("stream failed")
            yield ServerSentEvent(
                event=None if openai_done else "error",
                data=json.dumps(from_exception(e).body()),
            )
        finally:
            state.active_requests -= 1
            await stream.aclose()

    # ping=0: our own pings, sent only while nothing else is (sse-starlette's are periodic).
    return EventSourceResponse(events(), ping=0, headers=SSE_HEADERS, sep="\n")


def error_event(final: FinalEvent) -> dict[str, Any]:
    """The in-band error body for a request that ended with `error`."""
    return envelope(final.error or "generation failed", "internal_error", None, "generation_error")


def wants_stream(request: Request, stream_field: bool | None) -> bool:
    """The body's `stream` decides; only when it is absent does `Accept` ask for SSE."""
    if stream_field is not None:
        return stream_field
    return "text/event-stream" in request.headers.get("accept", "")
