"""The engine's batched tensor calls, each keeping a failure with the work that caused it.

The runner owns the model-side state of every running item: the SONAR-LLM's paged KV cache,
the SONAR decoder's token-level batch (both on one `BlockManager`), and the encoder cache. Each call
takes the rows of many items at once; when the batched call raises, it is retried item by item,
so only the items whose data fails end (`Outcome.errors`), and every other item gets exactly
what it gets without them. Nothing here knows about queues, events or HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from torch import Tensor

from models.block_manager import BlockManager, pages_for
from models.decode_batch import BeamRequest, beam_pages
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded, DecodeOptions
from server.engine.encoder_cache import EncoderCache

log = logging.getLogger("sonar_llm.engine")

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

LLM = "llm"
DECODER = "decoder"


@dataclass
class Outcome(Generic[K, R]):
    """Per item: a result, or why its part of the call failed."""

    results: dict[K, R] = field(default_factory=dict)
    errors: dict[K, str] = field(default_factory=dict)


def isolate(what: str, owners: list[K], run: Callable[[list[K]], dict[K, R]]) -> Outcome[K, R]:
    """`run(owners)`; if it raises, `run([owner])` for each, so only failing owners fail."""
    out: Outcome[K, R] = Outcome()
    if not owners:
        return out
    try:
        out.results = run(owners)
        return out
    except Exception as e:
        if len(owners) == 1:
            log.exception("%s failed", what)
            out.errors[owners[0]] = f"{what} failed: {e}"
            return out
        log.warning("batched %s failed; retrying item by item", what, exc_info=True)
    for owner in owners:
        try:
            out.results.update(run([owner]))
        except Exception as e:
            log.exception("%s failed for one item", what)
            out.errors[owner] = f"{what} failed: {e}"
    return out


@dataclass(frozen=True)
class EncodeTask:
    """Texts of one owner to encode, with a language each."""

    texts: list[str]
    langs: list[str]


@dataclass(frozen=True)
class DecodeTask:
    """One embedding to decode into a sentence."""

    embedding: Tensor
    lang: str
    options: DecodeOptions


class Runner:
    def __init__(self, pipe: SonarLLMPipeline, pool: BlockManager, encoder_cache_size: int) -> None:
        self.pipe = pipe
        self.pool = pool
        self.kv = pipe.model.new_cache(pool, LLM)
        codec = pipe.codec
        # Every sentence, beam-searched or sampled, decodes in this one token-level batch.
        self.decoder = codec.new_batch(pool=pool, owner=DECODER)
        self.encoder_cache = EncoderCache(codec, encoder_cache_size)

    def cache_bytes(self, kind: str = "allocated") -> dict[str, int]:
        """Bytes of each cache: its pages ("allocated"), or the positions it holds ("used")."""
        if kind == "used":
            return {LLM: self.kv.used_bytes(), DECODER: self.decoder.used_bytes()}
        return {LLM: self.pool.held_bytes(LLM), DECODER: self.pool.held_bytes(DECODER)}

    # ----- what work costs (numbers for the scheduler) -------------------------------------
    def llm_pages(self, positions: int) -> int:
        return pages_for(positions, self.kv.block_positions)

    def decoder_pages(self, beam_size: int, max_tokens: int) -> int:
        """Pages one sentence holds in the decoder at worst (a sampled one: `beam_size` 1)."""
        stack = self.pipe.codec.decoder_stack
        length = min(max_tokens, stack.max_positions)
        return beam_pages(beam_size, length, self.decoder.block_positions)

    # ----- calls ---------------------------------------------------------------------------
    def encode(self, tasks: dict[K, EncodeTask]) -> Outcome[K, Tensor]:
        """Each owner's texts as [n, D] embeddings (misses encoded in one batch per language)."""

        def run(owners: list[K]) -> dict[K, Tensor]:
            texts = [t for o in owners for t in tasks[o].texts]
            langs = [lg for o in owners for lg in tasks[o].langs]
            vectors = self.encoder_cache.encode(texts, langs)
            out, start = {}, 0
            for o in owners:
                n = len(tasks[o].texts)
                out[o] = vectors[start : start + n]
                start += n
            return out

        return isolate("encode", list(tasks), run)

    def extend(self, chunks: dict[K, Tensor], what: str = "model step") -> Outcome[K, Tensor]:
        """Append each owner's embeddings to its KV sequence; its last hidden state."""

        def run(owners: list[K]) -> dict[K, Tensor]:
            hidden = self.pipe.model.extend(self.kv, list(owners), [chunks[o] for o in owners])
            return dict(zip(owners, hidden, strict=True))

        return isolate(what, list(chunks), run)

    def start_decoding(self, tasks: dict[K, DecodeTask]) -> Outcome[K, Decoded]:
        """Every row joins the token-level batch (results come from later `decode_step`s):
        beam searches and sampled sentences alike, so no row is decoded on its own here."""
        codec = self.pipe.codec
        decoder = self.decoder
        out: Outcome[K, Decoded] = Outcome()
        joining: dict[K, BeamRequest] = {}
        for key, t in tasks.items():
            try:
                req = codec.beam_request(key, t.embedding, t.lang, t.options)
                decoder.check(req)
            except Exception as e:
                out.errors[key] = f"decode failed: {e}"
                continue
            joining[key] = req

        def add(keys: list[K]) -> dict[K, None]:
            decoder.add([joining[k] for k in keys])
            return {}

        out.errors.update(isolate("decode", list(joining), add).errors)
        return out

    def decode_step(self) -> Outcome[Hashable, Decoded]:
        """One token for every row in the decoder: the sentences that ended, the rows that
        failed (the decoder isolates a failing beam itself)."""
        out: Outcome[Hashable, Decoded] = Outcome()
        if not len(self.decoder):
            return out
        step = self.decoder.step()
        for key, seq in step.finished:
            out.results[key] = self.pipe.codec.to_decoded(seq)
        for key, why in step.failed:
            out.errors[key] = f"decode failed: {why}"
        return out

    # ----- leaving -------------------------------------------------------------------------
    def drop(self, keys: set[Hashable], decoder_keys: Callable[[Hashable], bool]) -> None:
        """Free the KV sequences of `keys` and the decoder rows whose key matches."""
        for key in keys:
            self.kv.remove(key)
        decoder = self.decoder
        if len(decoder):
            gone = {k for k in decoder.members() if decoder_keys(k)}
            if gone:
                decoder.remove(gone)

    @property
    def decoding(self) -> int:
        """Sentences in the decoder's batch."""
        return len(self.decoder)
