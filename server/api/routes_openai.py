"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models[/{id}].

A choice's text is its generated sentences joined by spaces. Usage counts sentences (the model's
unit); `decoded_tokens` reports SONAR decoder tokens. `max_tokens` bounds each decoded sentence;
the number of sentences is `max_sentences` (an extra body field, default 8). Every field a
request may carry is honoured or refused with 400 naming it (see README, "OpenAI coverage").

Choices: each prompt of `/v1/completions` (several are allowed) gets `n` choices, index
`prompt × n + j`, each an independent generation that gets exactly what it would get alone.
With a `seed`, choice j samples with `seed + j`; with deterministic settings (temperature 0 and
latent_temperature 0, the defaults) the n choices are identical.

`finish_reason`: `stop` (the end-of-sequence sentence or a stop string), `length`
(`max_sentences` reached, or the request was cut short by its deadline or the server's
shutdown: nothing claims a natural end it did not reach).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from server.api.generation import (
    Merged,
    collect,
    error_event,
    request_id,
    sse_response,
    submit_all,
)
from server.api.openai_work import (
    Served,
    chat_prompt,
    chat_response,
    check_model,
    choice_requests,
    completion_prompts,
    completion_response,
    finish_reason,
    usage,
)
from server.api.routes_generate import ERRORS
from server.api.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIExtras,
    OpenAIUsage,
)
from server.api.state import AppState
from server.engine import EventStream, FinalEvent, GenerationRequest, SentenceEvent

router = APIRouter(prefix="/v1", tags=["openai"])
UNKNOWN_MODEL = {"model": ErrorResponse, "description": "Unknown model"}


def _stream_doc(chunk: type) -> dict[str, Any]:
    return {
        "description": f"The result; with `stream: true` a stream of `data: {{{chunk.__name__}}}`"
        " lines (with `stream_options.include_usage`, a last chunk with `choices: []` and the "
        "usage), then `data: [DONE]`; an error after the start arrives as `data: "
        "{ErrorResponse}`.",
        "content": {
            "text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}
        },
    }


def served(request: Request) -> tuple[AppState, Served]:
    """The app's state and what an answer depends on (503 while there is no engine)."""
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    return state, Served(state.settings, engine, state.model_name, request_id(request))


async def _begin(
    request: Request, body: OpenAIExtras, make: Callable[[Served], list[GenerationRequest]]
) -> tuple[AppState, Served, list[EventStream]]:
    """One engine request per choice (prompt × n), all admitted or none."""
    check_model(request.app.state.sonar.model_name, body.model)  # before readiness, as ever
    state, ctx = served(request)
    return state, ctx, await submit_all(ctx.engine, list(make(ctx)))


async def _collect_all(
    state: AppState, request: Request, streams: list[EventStream]
) -> list[FinalEvent]:
    results = await asyncio.gather(
        *(collect(state, request, s) for s in streams), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException):
            for s in streams:
                await s.aclose()
            raise r
    return [final for _, final in results]  # type: ignore[misc]


def _stream(
    state: AppState, body: OpenAIExtras, streams: list[EventStream], cid: str, chat: bool
) -> Any:
    created = int(time.time())
    with_usage = bool(body.stream_options and body.stream_options.include_usage)
    started: set[int] = set()
    finals: list[tuple[int, FinalEvent]] = []
    chunk_type = ChatCompletionChunk if chat else CompletionChunk

    def chunk(choices: list[Any], usage: OpenAIUsage | None = None) -> ServerSentEvent:
        out = chunk_type(id=cid, created=created, model=state.model_name, choices=choices)
        data = out.model_dump(exclude_none=False)
        if with_usage:
            data["usage"] = usage.model_dump() if usage is not None else None
        else:
            data.pop("usage", None)
        return ServerSentEvent(data=json.dumps(data))

    def render(item: tuple[int, SentenceEvent | FinalEvent]) -> list[ServerSentEvent]:
        index, event = item
        if isinstance(event, FinalEvent):
            if event.finish_reason == "error":
                return [ServerSentEvent(data=json.dumps(error_event(event)))]
            finals.append((index, event))
            reason = finish_reason(event.finish_reason)
            choice: Any = (
                ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)  # type: ignore[arg-type]
                if chat
                else CompletionChunkChoice(index=index, text="", finish_reason=reason)  # type: ignore[arg-type]
            )
            return [chunk([choice])]
        text = event.text if event.index == 0 else " " + event.text
        if chat:
            role = "assistant" if index not in started else None
            choice = ChatChunkChoice(
                index=index, delta=ChatDelta(role=role, content=text), finish_reason=None
            )
        else:
            choice = CompletionChunkChoice(index=index, text=text, finish_reason=None)
        started.add(index)
        return [chunk([choice])]

    def closing() -> list[ServerSentEvent]:
        if not with_usage or len(finals) != len(streams):
            return []
        return [chunk([], usage(finals, body.n))]

    return sse_response(state, Merged(streams), render, openai_done=True, closing=closing)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: _stream_doc(CompletionChunk), 404: UNKNOWN_MODEL, **ERRORS},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompts = completion_prompts(body)
    state, ctx, streams = await _begin(request, body, lambda c: choice_requests(c, body, prompts))
    if body.stream:
        return _stream(state, body, streams, f"cmpl-{ctx.request_id}", chat=False)
    return completion_response(ctx, body, await _collect_all(state, request, streams))


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: _stream_doc(ChatCompletionChunk), 404: UNKNOWN_MODEL, **ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    turns = chat_prompt(body)
    state, ctx, streams = await _begin(
        request, body, lambda c: choice_requests(c, body, [turns], turns=True)
    )
    if body.stream:
        return _stream(state, body, streams, f"chatcmpl-{ctx.request_id}", chat=True)
    return chat_response(ctx, body, await _collect_all(state, request, streams))


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(request: Request) -> ModelList:
    state: AppState = request.app.state.sonar
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses={401: ERRORS[401], 404: UNKNOWN_MODEL},
)
async def model(model_id: str, request: Request) -> ModelCard:
    state: AppState = request.app.state.sonar
    check_model(state.model_name, model_id)
    return ModelCard(id=state.model_name, created=state.created)


# HEAD as GET without a body (for probes), left out of the published schema.
router.add_api_route("/models", models, methods=["HEAD"], include_in_schema=False)
