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
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from models.generate import GenerationError, GenerationOptions, Prompt, prompt_sentences
from models.sonar_codec import DecodeOptions
from server.api.errors import APIError, ClientGone, envelope, from_exception
from server.api.state import AppState
from server.engine import EventStream, FinalEvent, GenerationRequest, SentenceEvent

log = logging.getLogger("sonar_llm.api")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DEFAULT_MAX_SENTENCES = 8


@dataclass(frozen=True)
class Knobs:
    """Generation settings as the wire gives them (native fields or OpenAI extras)."""

    max_sentences: int | None = None
    eos_threshold: float | None = None
    eos_text: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    beam_size: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    latent_temperature: float | None = None
    seed: int | None = None
    timeout: float | None = None

    @classmethod
    def of(cls, body: Any) -> Knobs:
        return cls(**{f: getattr(body, f, None) for f in cls.__dataclass_fields__})


def build_options(
    state: AppState, k: Knobs, default_max_sentences: int | None = None
) -> GenerationOptions:
    """GenerationOptions within the server's limits; GenerationError names a bad field.

    `default_max_sentences` is what the client asked for in another field (/summarize's
    `num_sentences`); None means the server's default, which never exceeds the server's limit.
    """
    limits = state.settings
    param = "max_sentences"
    if k.max_sentences is not None:
        max_sentences = k.max_sentences
    elif default_max_sentences is not None:
        max_sentences, param = default_max_sentences, "num_sentences"
    else:
        max_sentences = min(DEFAULT_MAX_SENTENCES, limits.max_sentences_limit)
    if max_sentences > limits.max_sentences_limit:
        raise GenerationError(
            param,
            f"must be at most {limits.max_sentences_limit} on this server, got {max_sentences}",
        )
    top_p = None if k.top_p == 1.0 else k.top_p  # 1.0 keeps every token: the same as unset
    if (top_p is not None or k.top_k is not None) and not k.temperature:
        raise GenerationError("temperature", "top_p/top_k need a temperature > 0 (sampling)")
    decode = DecodeOptions(
        beam_size=k.beam_size or 5,
        max_tokens=k.max_tokens or 256,
        temperature=k.temperature or 0.0,
        top_p=top_p,
        top_k=k.top_k,
    )
    defaults = GenerationOptions()
    return GenerationOptions(
        max_sentences=max_sentences,
        eos_threshold=defaults.eos_threshold if k.eos_threshold is None else k.eos_threshold,
        eos_text=k.eos_text or defaults.eos_text,
        source_lang=k.source_lang or defaults.source_lang,
        target_lang=k.target_lang or defaults.target_lang,
        decode=decode,
        latent_temperature=k.latent_temperature or 0.0,
        seed=k.seed,
    )


async def start(
    state: AppState,
    request: Request,
    prompt: Prompt,
    opts: GenerationOptions,
    timeout: float | None,
    return_embeddings: bool = False,
) -> EventStream:
    """Admit a request into the engine (503 when not ready, draining or full)."""
    engine = state.require_engine()
    if isinstance(prompt, str) and len(prompt) > state.settings.max_body_bytes:
        raise GenerationError("prompt", "is too long")
    # Split and count before submitting: a prompt over the limit must never enter the queue
    # (where withdrawing it counted as a client cancellation, or it got prefilled first).
    # The engine takes the split list as is, so the text is split once.
    add_begin = engine.pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
    sentences = prompt_sentences(prompt, opts.source_lang, add_begin=False)
    if len(sentences) + int(add_begin) > state.settings.max_prompt_sentences:
        raise GenerationError(
            "prompt",
            f"has {len(sentences) + int(add_begin)} sentences; this server accepts at most "
            f"{state.settings.max_prompt_sentences}",
        )
    gen = GenerationRequest(
        prompt=sentences,
        options=opts,
        timeout=_deadline(timeout, state.settings.request_timeout),
        return_embeddings=return_embeddings,
        request_id=request_id(request),
    )
    return await engine.submit(gen)


def request_id(request: Request) -> str:
    """The X-Request-Id the middleware settled on (one is made if there is none)."""
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid else uuid.uuid4().hex


def _deadline(asked: float | None, server: float | None) -> float | None:
    """The request's own timeout, never beyond the server's request_timeout."""
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

    async def drain() -> tuple[list[SentenceEvent], FinalEvent]:
        sentences: list[SentenceEvent] = []
        async for event in stream:
            if isinstance(event, FinalEvent):
                return sentences, event
            sentences.append(event)
        raise RuntimeError("event stream ended without a final event")

    state.active_requests += 1
    work = asyncio.ensure_future(drain())
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
    if final.finish_reason != "stop":
        raise APIError(
            504 if final.finish_reason == "timeout" else 503,
            f"the job ended early: {final.finish_reason}",
            code=final.finish_reason,
        )
    return final


def sse_response(
    state: AppState,
    stream: EventStream,
    render: Callable[[SentenceEvent | FinalEvent], list[ServerSentEvent]],
    openai_done: bool = False,
) -> EventSourceResponse:
    """Stream events as SSE with `: ping` while idle; errors after the start go in-band."""
    interval = state.settings.keepalive_interval

    async def events() -> AsyncIterator[ServerSentEvent]:
        state.active_requests += 1
        try:
            while True:
                event = await stream.next(interval)
                if event is None:
                    yield ServerSentEvent(comment="ping")
                    continue
                for out in render(event):
                    yield out
                if isinstance(event, FinalEvent):
                    break
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


def wants_stream(request: Request, stream_field: bool) -> bool:
    return stream_field or "text/event-stream" in request.headers.get("accept", "")
