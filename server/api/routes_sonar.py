"""SONAR as a service: POST /embed (texts → embeddings), POST /decode (embeddings → texts),
POST /segment (text → the sentences generation sees), and GET /v1/languages (what all of them,
and generation, accept as a language).

Both are engine work like any generation: queued under the same bound (503 when full),
admitted under the same cache memory (decode rows join the decoder's batch), spread over
iterations (texts are encoded in bounded chunks), cancelled when the client leaves, and waited
for by the drain at shutdown. So a large job never freezes the streams beside it.
"""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request

from models.generate import GenerationError
from models.sentences import splitter_name
from models.sonar_codec import Decoded, DecodeOptions, sonar_languages
from server.api import generation
from server.api.languages import language_name
from server.api.routes_generate import ERRORS
from server.api.schemas import (
    DecodeBody,
    DecodeResponse,
    EmbedBody,
    EmbedResponse,
    Language,
    LanguagesResponse,
    SegmentRequest,
    SegmentResponse,
)
from server.api.state import AppState
from server.engine import DecodeRequest, EmbedRequest

router = APIRouter(tags=["sonar"])


@router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedBody, request: Request) -> EmbedResponse:
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    work = EmbedRequest(
        texts=body.texts,
        lang=body.lang,
        timeout=state.settings.request_timeout,
        request_id=generation.request_id(request),
    )
    final = await generation.run_job(
        state, request, (await generation.submit_all(engine, [work]))[0]
    )
    assert isinstance(final.result, torch.Tensor)
    return EmbedResponse(
        model=state.model_name, dim=engine.processor.embed_dim, embeddings=final.result.tolist()
    )


@router.post("/decode", response_model=DecodeResponse, responses=ERRORS)
async def decode(body: DecodeBody, request: Request) -> DecodeResponse:
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    work = DecodeRequest(
        embeddings=body.embeddings,
        lang=body.lang,
        options=DecodeOptions(beam_size=body.beam_size, max_tokens=body.max_tokens),
        timeout=state.settings.request_timeout,
        request_id=generation.request_id(request),
    )
    final = await generation.run_job(
        state, request, (await generation.submit_all(engine, [work]))[0]
    )
    decoded: list[Decoded] = final.result  # type: ignore[assignment]
    return DecodeResponse(
        model=state.model_name,
        texts=[d.text for d in decoded],
        decoded_tokens=sum(d.num_tokens for d in decoded),
    )


@router.post("/segment", response_model=SegmentResponse, responses=ERRORS)
async def segment(body: SegmentRequest, request: Request) -> SegmentResponse:
    """The sentences `text` becomes as a /generate prompt in `lang`: the same function the
    engine uses, so "Begin of text." comes first when the model's config has add_begin."""
    state: AppState = request.app.state.sonar
    engine = state.require_engine()
    if body.lang not in sonar_languages():
        raise GenerationError(
            "lang", f"unknown language {body.lang!r}: use a SONAR/NLLB code such as eng_Latn"
        )
    processor = engine.processor
    return SegmentResponse(
        sentences=processor.sentences(body.text, body.lang, processor.add_begin()),
        splitter=splitter_name(body.lang),  # type: ignore[arg-type]
    )


@router.get("/v1/languages", response_model=LanguagesResponse, responses=ERRORS)
async def languages() -> LanguagesResponse:
    """Every language SONAR reads and writes: NLLB code and English name, sorted by name."""
    codes = sonar_languages()
    rows = sorted((language_name(c), c) for c in codes)
    return LanguagesResponse(data=[Language(code=code, name=name) for name, code in rows])
