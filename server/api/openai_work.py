"""OpenAI request bodies as engine work, and final events as OpenAI response bodies.

The routes (`routes_openai`, `routes_embeddings`) and `sonar-llm batch` call these same
functions, so an offline answer is the server's answer for the same body. They raise
GenerationError (400 naming the field) or APIError, as a route would answer them.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from models.generate import FinishReason, GenerationError, Prompt
from models.sonar_codec import CodecTokenizer, UnknownLanguageError
from server.api.embedding_schemas import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
)
from server.api.errors import APIError
from server.api.generation import build_options, check_job, generation_request
from server.api.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    OpenAIExtras,
    OpenAIUsage,
)
from server.engine import EmbedRequest, Engine, FinalEvent, GenerationRequest
from server.settings import Settings


@dataclass(frozen=True)
class Served:
    """What an answer depends on besides the body: the server's limits, its engine, the name
    of the model it serves, and the request's id."""

    settings: Settings
    engine: Engine
    model_name: str
    request_id: str


def check_model(served_model: str, model: str | None) -> None:
    """404 for a model this server does not serve (None: the one it serves)."""
    if model is not None and model != served_model:
        raise APIError(
            404,
            f"The model {model!r} does not exist; this server serves {served_model!r}",
            param="model",
            code="model_not_found",
        )


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's reasons: a natural end is `stop` (the EOS sentence, a stop string, and the
    repetition stop, which OpenAI has no name for); a cut (deadline, shutdown) is `length`."""
    return "stop" if reason in ("stop", "repetition") else "length"


def usage(finals: list[tuple[int, FinalEvent]], n: int) -> OpenAIUsage:
    """Sentences: each prompt counted once, every choice's output counted."""
    prompt = sum(f.usage.prompt_sentences for i, f in finals if i % n == 0)
    completion = sum(f.usage.generated_sentences for _, f in finals)
    return OpenAIUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        decoded_tokens=sum(f.usage.decoded_tokens for _, f in finals),
    )


# ----- bodies → engine requests ---------------------------------------------------------------
def completion_prompts(body: CompletionRequest) -> list[Prompt]:
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            param = "prompt" if isinstance(body.prompt, str) else f"prompt.{i}"
            raise GenerationError(param, "must contain at least one non-whitespace character")
    return list(prompts)


def chat_prompt(body: ChatCompletionRequest) -> list[str]:
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


def choice_requests(
    served: Served, body: OpenAIExtras, prompts: list[Prompt], turns: bool = False
) -> list[GenerationRequest]:
    """One engine request per choice (prompt × n), in choice order; nothing is queued.
    `turns`: each prompt is a list of chat turns, each split by the engine."""
    check_model(served.model_name, body.model)
    config = served.engine.config
    if len(prompts) * body.n > config.capacity:
        # Never a 503: no retry could ever admit it.
        raise GenerationError(
            "n",
            f"{len(prompts)} prompt(s) × n={body.n} asks for {len(prompts) * body.n} "
            f"generations; this server holds at most {config.capacity} at once (max_running "
            f"{config.max_running} + max_waiting {config.max_waiting})",
        )
    values = body.option_values()
    values["max_tokens"] = values["max_tokens"] or body.max_completion_tokens
    opts = build_options(served.settings, values)
    gens: list[GenerationRequest] = []
    for prompt in prompts:
        first = generation_request(
            served.settings, prompt, opts, body.timeout, served.request_id, turns=turns
        )
        for j in range(body.n):
            seeded = opts if opts.seed is None or j == 0 else opts.with_seed(opts.seed + j)
            gens.append(dataclasses.replace(first, options=seeded))
    return gens


def embed_request(served: Served, body: EmbeddingsRequest) -> EmbedRequest:
    """The engine job for `/v1/embeddings` (the same job as `/embed`)."""
    check_model(served.model_name, body.model)
    codec = served.engine.pipe.codec
    if body.dimensions is not None and body.dimensions != codec.embed_dim:
        raise GenerationError(
            "dimensions",
            f"must be {codec.embed_dim} (this model's embedding width) or left out; SONAR "
            "embeddings cannot be shortened",
        )
    try:
        codec.check_lang(body.source_lang)
    except UnknownLanguageError as e:
        raise GenerationError("source_lang", str(e)) from None
    return EmbedRequest(
        texts=[body.input] if isinstance(body.input, str) else list(body.input),
        lang=body.source_lang,
        timeout=served.settings.request_timeout,
        request_id=served.request_id,
    )


# ----- final events → response bodies ---------------------------------------------------------
def _envelope(
    served: Served, body: OpenAIExtras, finals: list[FinalEvent], prefix: str
) -> dict[str, Any]:
    """What both completion responses carry besides their choices (a failed choice: 500)."""
    for f in finals:
        if f.finish_reason == "error":
            raise APIError(500, f.error or "generation failed", code="generation_error")
    return {
        "id": f"{prefix}-{served.request_id}",
        "created": int(time.time()),
        "model": served.model_name,
        "usage": usage(list(enumerate(finals)), body.n),
    }


def completion_response(
    served: Served, body: CompletionRequest, finals: list[FinalEvent]
) -> CompletionResponse:
    """The answer to `/v1/completions`: one choice per final event, in choice order."""
    choices = [
        CompletionChoice(
            index=i,
            text=" ".join(f.sentences),
            finish_reason=finish_reason(f.finish_reason),  # type: ignore[arg-type]
        )
        for i, f in enumerate(finals)
    ]
    return CompletionResponse(**_envelope(served, body, finals, "cmpl"), choices=choices)


def chat_response(
    served: Served, body: ChatCompletionRequest, finals: list[FinalEvent]
) -> ChatCompletionResponse:
    """The answer to `/v1/chat/completions`: one choice per final event, in choice order."""
    choices = [
        ChatChoice(
            index=i,
            message=ChatMessageOut(content=" ".join(f.sentences)),
            finish_reason=finish_reason(f.finish_reason),  # type: ignore[arg-type]
        )
        for i, f in enumerate(finals)
    ]
    return ChatCompletionResponse(**_envelope(served, body, finals, "chatcmpl"), choices=choices)


def count_tokens(tokenizer: CodecTokenizer, texts: list[str], lang: str) -> int:
    """Tokens the SONAR encoder reads for `texts` (its language token and `</s>` included)."""
    return sum(len(ids) for ids in tokenizer.source_ids(texts, lang))


def _encoded(row: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # as OpenAI: the little-endian float32 bytes
        data = row.to(torch.float32).numpy().astype("<f4").tobytes()
        return base64.b64encode(data).decode("ascii")
    return row.tolist()  # type: ignore[no-any-return]


def embeddings_response(
    served: Served, body: EmbeddingsRequest, final: FinalEvent, tokens: int
) -> EmbeddingsResponse:
    """The answer to `/v1/embeddings`; `tokens`: `count_tokens` of the job's texts."""
    check_job(final)
    assert isinstance(final.result, torch.Tensor)
    return EmbeddingsResponse(
        data=[
            Embedding(index=i, embedding=_encoded(row, body.encoding_format))
            for i, row in enumerate(final.result)
        ],
        model=served.model_name,
        usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
