"""POST /generate and POST /summarize: JSON, or Server-Sent Events with `stream: true`."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from sse_starlette import ServerSentEvent

from models.generate import Prompt, summarization_prompt
from server.api.errors import APIError
from server.api.generation import (
    build_options,
    collect,
    error_event,
    sse_response,
    start,
    wants_stream,
)
from server.api.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    GenerationFields,
    SentenceOut,
    SummarizeRequest,
    Usage,
)
from server.api.state import AppState
from server.engine import EventStream, FinalEvent, SentenceEvent

router = APIRouter(tags=["generation"])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid field (`param` names it)"),
        (401, "Missing or wrong API key"),
        (413, "Body too large"),
        (415, "Body is not JSON"),
        (503, "Loading, draining or overloaded (see Retry-After)"),
    )
}
STREAM_DOC = {
    "description": "The result; with `stream: true` (or `Accept: text/event-stream`) a stream "
    "of `event: sentence` (SentenceOut), then `event: done` (GenerateResponse), or `event: "
    "error` (ErrorResponse); `: ping` comments keep idle connections open.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _response(
    state: AppState,
    stream: EventStream,
    sentences: list[SentenceEvent],
    final: FinalEvent,
    with_prompt: bool,
) -> GenerateResponse:
    embeddings = [s.embedding for s in sentences if s.embedding is not None]
    rid = stream.request_id
    return GenerateResponse(
        id=rid,
        model=state.model_name,
        sentences=final.sentences,
        text=" ".join(final.sentences),
        finish_reason=final.finish_reason,
        usage=Usage(**final.usage.as_dict()),  # type: ignore[arg-type]
        embeddings=embeddings if len(embeddings) == len(sentences) and sentences else None,
        prompt_sentences=stream.prompt if with_prompt else None,
    )


async def _run(
    request: Request,
    prompt: Prompt | None,
    body: GenerationFields,
    default_max: int | None,
    prompt_embeddings: list[list[float]] | None = None,
    turns: bool = False,
) -> Response | GenerateResponse:
    state: AppState = request.app.state.sonar
    opts = build_options(state.settings, body.option_values(), default_max)
    stream = await start(
        state, request, prompt, opts, body.timeout, body.return_embeddings, prompt_embeddings, turns
    )
    rid = stream.request_id

    if wants_stream(request, body.stream):
        sentences: list[SentenceEvent] = []

        def render(event: SentenceEvent | FinalEvent) -> list[ServerSentEvent]:
            if isinstance(event, SentenceEvent):
                sentences.append(event)
                out = SentenceOut(
                    id=rid,
                    index=event.index,
                    text=event.text,
                    num_tokens=event.num_tokens,
                    embedding=event.embedding,
                )
                return [ServerSentEvent(event="sentence", data=out.model_dump_json())]
            if event.finish_reason == "error":
                return [ServerSentEvent(event="error", data=json.dumps(error_event(event)))]
            done = _response(state, stream, sentences, event, body.return_embeddings)
            return [ServerSentEvent(event="done", data=done.model_dump_json())]

        return sse_response(state, stream, render)

    events, final = await collect(state, request, stream)
    return _response(state, stream, events, final, body.return_embeddings)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: STREAM_DOC, **ERRORS},
    summary="Continue a text, sentence by sentence",
)
async def generate(body: GenerateRequest, request: Request) -> Response | GenerateResponse:
    prompt = body.prompt
    if prompt is None and body.prompt_embeddings is None:
        raise APIError(
            400,
            "prompt: Field required (give a prompt, prompt_embeddings, or both)",
            param="prompt",
            code="missing",
        )
    # A list is a chat's turns: the engine splits each, in order (as /v1/chat's).
    return await _run(request, prompt, body, None, body.prompt_embeddings, turns=True)


@router.post(
    "/summarize",
    response_model=GenerateResponse,
    responses={200: STREAM_DOC, **ERRORS},
    summary="Summarise a document (its sentences + an instruction sentence, as in the paper)",
)
async def summarize(body: SummarizeRequest, request: Request) -> Response | GenerateResponse:
    prompt = summarization_prompt(
        body.document, body.num_sentences, body.instruction, body.option_values()["source_lang"]
    )
    return await _run(request, prompt, body, body.num_sentences)
