"""OpenAI's embeddings API: POST /v1/embeddings, SONAR sentence embeddings for RAG frameworks.

The same engine job as `/embed` (same queue, limits, batching and cancellation), so the vectors
are identical to `/embed`'s; only the shapes are OpenAI's. `usage` counts SONAR tokenizer
tokens. The texts' language is the extra field `source_lang` (default eng_Latn).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from server.api import generation
from server.api.embedding_schemas import EmbeddingsRequest, EmbeddingsResponse
from server.api.openai_work import check_model, count_tokens, embed_request, embeddings_response
from server.api.routes_generate import ERRORS
from server.api.routes_openai import UNKNOWN_MODEL, served

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    responses={404: UNKNOWN_MODEL, **ERRORS},
)
async def embeddings(body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
    check_model(request.app.state.sonar.model_name, body.model)  # before readiness, as ever
    state, ctx = served(request)
    job = embed_request(ctx, body)
    final = await generation.run_job(
        state, request, (await generation.submit_all(ctx.engine, [job]))[0]
    )
    tokenizer = ctx.engine.pipe.codec.tokenizer
    tokens = await asyncio.to_thread(count_tokens, tokenizer, job.texts, job.lang)
    return embeddings_response(ctx, body, final, tokens)
