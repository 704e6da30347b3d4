"""OpenAI's embeddings API: POST /v1/embeddings, SONAR sentence embeddings for RAG frameworks.

The same engine job as `/embed` (same queue, limits, batching and cancellation), so the vectors
are identical to `/embed`'s; only the shapes are OpenAI's. `usage` counts SONAR tokenizer
tokens. The texts' language is the extra field `source_lang` (default eng_Latn).
"""

from __future__ import annotations

import asyncio
import base64

import torch
from fastapi import APIRouter, Request

from models.generate import GenerationError
from models.sonar_codec import CodecTokenizer, UnknownLanguageError
from server.api import generation
from server.api.embedding_schemas import (
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
)
from server.api.routes_generate import ERRORS
from server.api.routes_openai import UNKNOWN_MODEL, check_model
from server.api.state import AppState
from server.engine import EmbedRequest as EmbedWork

router = APIRouter(prefix="/v1", tags=["openai"])


def count_tokens(tokenizer: CodecTokenizer, texts: list[str], lang: str) -> int:
    """Tokens the SONAR encoder reads for `texts` (its language token and `</s>` included)."""
    return sum(len(ids) for ids in tokenizer.source_ids(texts, lang))


def _encoded(row: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # as OpenAI: the little-endian float32 bytes
        data = row.to(torch.float32).numpy().astype("<f4").tobytes()
        return base64.b64encode(data).decode("ascii")
    return row.tolist()  # type: ignore[no-any-return]


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    responses={404: UNKNOWN_MODEL, **ERRORS},
)
async def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
    state: AppState = request.app.state.sonar
    check_model(state, body.model)
    engine = state.require_engine()
    dim = engine.pipe.codec.embed_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise GenerationError(
            "dimensions",
            f"must be {dim} (this model's embedding width) or left out; SONAR embeddings "
            "cannot be shortened",
        )
    try:
        engine.pipe.codec.check_lang(body.source_lang)
    except UnknownLanguageError as e:
        raise GenerationError("source_lang", str(e)) from None
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    work = EmbedWork(
        texts=texts,
        lang=body.source_lang,
        timeout=state.settings.request_timeout,
        request_id=generation.request_id(request),
    )
    final = await generation.run_job(state, request, await engine.submit(work))
    assert isinstance(final.result, torch.Tensor)
    tokens = await asyncio.to_thread(count_tokens, engine.pipe.codec.tokenizer, texts, work.lang)
    return EmbeddingsResponse(
        data=[
            Embedding(index=i, embedding=_encoded(row, body.encoding_format))
            for i, row in enumerate(final.result)
        ],
        model=state.model_name,
        usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
