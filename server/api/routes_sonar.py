"""SONAR as a service: POST /embed (texts → embeddings) and POST /decode (embeddings → texts).

Both run on the engine thread between iterations, so they never race the batch on the device.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request

from models.generate import GenerationError
from models.sonar_codec import DecodeOptions, UnknownLanguageError
from server.api.routes_generate import ERRORS
from server.api.schemas import DecodeRequest, DecodeResponse, EmbedRequest, EmbedResponse
from server.api.state import AppState

router = APIRouter(tags=["sonar"])


def _check_lang(state: AppState, lang: str) -> None:
    assert state.pipe is not None
    try:
        state.pipe.codec.check_lang(lang)
    except UnknownLanguageError as e:
        raise GenerationError("lang", str(e)) from None


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    _check_lang(state, body.lang)
    codec = engine.pipe.codec
    vectors = await engine.run_job(lambda: codec.encode(body.texts, body.lang).cpu())
    return EmbedResponse(model=state.model_name, dim=codec.embed_dim, embeddings=vectors.tolist())


@router.post("/decode", response_model=DecodeResponse, responses=ERRORS)
async def decode(body: DecodeRequest, request: Request) -> DecodeResponse:
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    _check_lang(state, body.lang)
    codec = engine.pipe.codec
    for i, row in enumerate(body.embeddings):
        if len(row) != codec.embed_dim:
            raise GenerationError(
                f"embeddings.{i}",
                f"has {len(row)} values; the model's embeddings have {codec.embed_dim}",
            )
    tensor = torch.tensor(body.embeddings, dtype=torch.float32)
    if not torch.isfinite(tensor).all():
        raise GenerationError("embeddings", "must be finite numbers")
    options = DecodeOptions(beam_size=body.beam_size, max_tokens=body.max_tokens)
    decoded = await engine.run_job(lambda: codec.decode(tensor, body.lang, options))
    return DecodeResponse(
        model=state.model_name,
        texts=[d.text for d in decoded],
        decoded_tokens=sum(d.num_tokens for d in decoded),
    )
