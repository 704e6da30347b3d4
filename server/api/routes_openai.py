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
import dataclasses
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from models.generate import FinishReason, GenerationError
from server.api.errors import APIError
from server.api.generation import (
    Merged,
    build_options,
    collect,
    error_event,
    prepare,
    sse_response,
)
from server.api.routes_generate import ERRORS
from server.api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
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


def _finish(reason: FinishReason) -> str:
    """OpenAI's reasons: a natural end is `stop` (the EOS sentence, a stop string, and the
    repetition stop, which OpenAI has no name for); a cut (deadline, shutdown) is `length`."""
    return "stop" if reason in ("stop", "repetition") else "length"


def _usage(finals: list[tuple[int, FinalEvent]], n: int) -> OpenAIUsage:
    """Sentences: each prompt counted once, every choice's output counted."""
    prompt = sum(f.usage.prompt_sentences for i, f in finals if i % n == 0)
    completion = sum(f.usage.generated_sentences for _, f in finals)
    return OpenAIUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        decoded_tokens=sum(f.usage.decoded_tokens for _, f in finals),
    )


def check_model(state: AppState, model: str | None) -> None:
    """404 for a model this server does not serve (None: the one it serves)."""
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def _begin(
    request: Request, body: OpenAIExtras, prompts: list[str | list[str]], turns: bool = False
) -> tuple[AppState, list[EventStream]]:
    """One engine request per choice (prompt × n), all admitted or none."""
    state: AppState = request.app.state.sonar
    check_model(state, body.model)
    engine = state.require_engine()
    capacity = engine.config.capacity
    if len(prompts) * body.n > capacity:
        # Never a 503: no retry could ever admit it.
        raise GenerationError(
            "n",
            f"{len(prompts)} prompt(s) × n={body.n} asks for {len(prompts) * body.n} "
            f"generations; this server holds at most {capacity} at once (max_running "
            f"{engine.config.max_running} + max_waiting {engine.config.max_waiting})",
        )
    values = body.option_values()
    values["max_tokens"] = values["max_tokens"] or body.max_completion_tokens
    opts = build_options(state, values)
    gens: list[GenerationRequest] = []
    for prompt in prompts:
        first = await prepare(state, request, prompt, opts, body.timeout, turns=turns)
        for j in range(body.n):
            seeded = opts if opts.seed is None or j == 0 else opts.with_seed(opts.seed + j)
            gens.append(dataclasses.replace(first, options=seeded))
    return state, await engine.submit_all(list(gens))


async def _collect_all(
    state: AppState, request: Request, streams: list[EventStream]
) -> list[tuple[int, FinalEvent]]:
    results = await asyncio.gather(
        *(collect(state, request, s) for s in streams), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException):
            for s in streams:
                await s.aclose()
            raise r
    return [(i, final) for i, (_, final) in enumerate(results)]  # type: ignore[misc]


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
            reason = _finish(event.finish_reason)
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
        return [chunk([], _usage(finals, body.n))]

    return sse_response(state, Merged(streams), render, openai_done=True, closing=closing)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: _stream_doc(CompletionChunk), 404: UNKNOWN_MODEL, **ERRORS},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            param = "prompt" if isinstance(body.prompt, str) else f"prompt.{i}"
            raise GenerationError(param, "must contain at least one non-whitespace character")
    state, streams = await _begin(request, body, list(prompts))
    cid = f"cmpl-{streams[0].request_id}"
    if body.stream:
        return _stream(state, body, streams, cid, chat=False)
    finals = await _collect_all(state, request, streams)
    _raise_if_failed(finals)
    return CompletionResponse(
        id=cid,
        created=int(time.time()),
        model=state.model_name,
        choices=[
            CompletionChoice(
                index=i,
                text=" ".join(f.sentences),
                finish_reason=_finish(f.finish_reason),  # type: ignore[arg-type]
            )
            for i, f in finals
        ],
        usage=_usage(finals, body.n),
    )


def _raise_if_failed(finals: list[tuple[int, FinalEvent]]) -> None:
    for _, f in finals:
        if f.finish_reason == "error":
            raise APIError(500, f.error or "generation failed", code="generation_error")


def _chat_prompt(body: ChatCompletionRequest) -> list[str]:
    """The conversation's turns, in order (the engine splits each): the model's context."""
    sentences: list[str] = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            parts = [p.text or "" for p in content if p.type == "text"]
            if len(parts) != len(content):
                raise GenerationError(f"messages.{i}.content", "only text parts are supported")
            content = " ".join(parts)
        if content and content.strip():
            sentences.append(content)
    if not sentences:
        raise GenerationError("messages", "contain no text")
    return sentences


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: _stream_doc(ChatCompletionChunk), 404: UNKNOWN_MODEL, **ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state, streams = await _begin(request, body, [_chat_prompt(body)], turns=True)
    cid = f"chatcmpl-{streams[0].request_id}"
    if body.stream:
        return _stream(state, body, streams, cid, chat=True)
    finals = await _collect_all(state, request, streams)
    _raise_if_failed(finals)
    return ChatCompletionResponse(
        id=cid,
        created=int(time.time()),
        model=state.model_name,
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=" ".join(f.sentences)),
                finish_reason=_finish(f.finish_reason),  # type: ignore[arg-type]
            )
            for i, f in finals
        ],
        usage=_usage(finals, body.n),
    )


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
    if model_id != state.model_name:
        raise APIError(
            404,
            f"The model {model_id!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )
    return ModelCard(id=state.model_name, created=state.created)


# HEAD as GET without a body (for probes), left out of the published schema.
router.add_api_route("/models", models, methods=["HEAD"], include_in_schema=False)
