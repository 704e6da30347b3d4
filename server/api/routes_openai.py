"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

The answer is the generated sentences joined by spaces. Usage counts sentences (the model's
unit); `decoded_tokens` reports SONAR decoder tokens. `max_tokens` bounds each decoded sentence;
the number of sentences is `max_sentences` (an extra body field, default 8).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from models.generate import FinishReason, GenerationError
from models.sentences import split_sentences
from server.api.errors import APIError
from server.api.generation import (
    Knobs,
    build_options,
    collect,
    error_event,
    sse_response,
    start,
)
from server.api.routes_generate import ERRORS
from server.api.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAIExtras,
    OpenAIUsage,
)
from server.api.state import AppState
from server.engine import EventStream, FinalEvent, SentenceEvent

router = APIRouter(prefix="/v1", tags=["openai"])
UNKNOWN_MODEL = {"model": ErrorResponse, "description": "Unknown model"}
STREAM_DOC = {
    "description": "With `stream: true`: `data: {chunk}` lines, then `data: [DONE]`.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _finish(reason: FinishReason) -> str:
    return "stop" if reason in ("stop", "cancelled") else "length"


def _usage(final: FinalEvent) -> OpenAIUsage:
    u = final.usage
    return OpenAIUsage(
        prompt_tokens=u.prompt_sentences,
        completion_tokens=u.generated_sentences,
        total_tokens=u.prompt_sentences + u.generated_sentences,
        decoded_tokens=u.decoded_tokens,
    )


def _check_model(state: AppState, body: OpenAIExtras) -> None:
    if body.model is not None and body.model != state.model_name:
        raise APIError(
            404,
            f"The model {body.model!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def _begin(
    request: Request, body: OpenAIExtras, prompt: str | list[str]
) -> tuple[AppState, EventStream]:
    state: AppState = request.app.state.sonar
    _check_model(state, body)
    knobs = Knobs.of(body)
    knobs = Knobs(**{**knobs.__dict__, "max_tokens": body.max_tokens or body.max_completion_tokens})
    opts = build_options(state, knobs)
    return state, await start(state, request, prompt, opts, body.timeout)


def _chunk_renderer(
    state: AppState, cid: str, created: int, obj: str, chat: bool, with_usage: bool
) -> Any:
    first = True

    def base(choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": cid,
            "object": obj,
            "created": created,
            "model": state.model_name,
            "choices": [choice],
        }

    def render(event: SentenceEvent | FinalEvent) -> list[ServerSentEvent]:
        nonlocal first
        if isinstance(event, FinalEvent):
            if event.finish_reason == "error":
                return [ServerSentEvent(data=json.dumps(error_event(event)))]
            choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(event.finish_reason)}
            if chat:
                choice["delta"] = {}
            else:
                choice.update(text="", logprobs=None)
            out = base(choice)
            if with_usage:
                out["usage"] = _usage(event).model_dump()
            return [ServerSentEvent(data=json.dumps(out))]
        text = event.text if event.index == 0 else " " + event.text
        if chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        first = False
        return [ServerSentEvent(data=json.dumps(base(choice)))]

    return render


def _stream_usage(body: OpenAIExtras) -> bool:
    options = getattr(body, "stream_options", None)
    return isinstance(options, dict) and bool(options.get("include_usage"))


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={200: STREAM_DOC, 404: UNKNOWN_MODEL, **ERRORS},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]  # schema: one item
    if not prompt.strip():
        raise GenerationError("prompt", "must contain at least one non-whitespace character")
    state, stream = await _begin(request, body, prompt)
    cid, created = f"cmpl-{stream.request_id}", int(time.time())
    if body.stream:
        render = _chunk_renderer(state, cid, created, "text_completion", False, _stream_usage(body))
        return sse_response(state, stream, render, openai_done=True)
    _, final = await collect(state, request, stream)
    return CompletionResponse(
        id=cid,
        created=created,
        model=state.model_name,
        choices=[
            CompletionChoice(
                text=" ".join(final.sentences), finish_reason=_finish(final.finish_reason)
            )  # type: ignore[arg-type]
        ],
        usage=_usage(final),
    )


def _chat_prompt(body: ChatCompletionRequest, lang: str) -> list[str]:
    """The conversation, in order, as sentences: the model's context."""
    sentences: list[str] = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            parts = [p.text or "" for p in content if p.type == "text"]
            if len(parts) != len(content):
                raise GenerationError(f"messages.{i}.content", "only text parts are supported")
            content = " ".join(parts)
        if content:
            sentences.extend(split_sentences(content, lang))
    if not sentences:
        raise GenerationError("messages", "contain no text")
    return sentences


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: STREAM_DOC, 404: UNKNOWN_MODEL, **ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    prompt = _chat_prompt(body, body.source_lang or "eng_Latn")
    state, stream = await _begin(request, body, prompt)
    cid, created = f"chatcmpl-{stream.request_id}", int(time.time())
    if body.stream:
        render = _chunk_renderer(
            state, cid, created, "chat.completion.chunk", True, _stream_usage(body)
        )
        return sse_response(state, stream, render, openai_done=True)
    _, final = await collect(state, request, stream)
    return ChatCompletionResponse(
        id=cid,
        created=created,
        model=state.model_name,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content=" ".join(final.sentences)),
                finish_reason=_finish(final.finish_reason),  # type: ignore[arg-type]
            )
        ],
        usage=_usage(final),
    )


@router.get("/models", response_model=ModelList, responses={401: ERRORS[401]})
async def models(request: Request) -> ModelList:
    state: AppState = request.app.state.sonar
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])
