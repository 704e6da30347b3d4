"""Batched incremental beam search for the SONAR text decoder, rows joining and leaving any step.

fairseq2's `BeamSearchSeq2SeqGenerator` (what the reference decodes with) runs one call per batch:
every embedding starts together and the call lasts as long as its longest sentence, and each
step rebuilds batch layouts and attention state in Python. This module runs the same search over
the same decoder weights as a persistent batch: `DecodeBatch.add()` puts an embedding in at any
step, `step()` advances every row by one token and returns the sentences that ended. The engine
keeps the decoder busy at token level; `SonarCodec.decode` uses it as a drop-in for one batch.

The search is fairseq2's, decision for decision (`tests/models/test_beam_search.py` compares the
two): the target prefix (`</s> __lang__`) is forced and scored, each step takes the best
2 × beam candidates of the flattened beam, finishes EOS among the first `beam` of them (score
normalised by length), continues with the first `beam` non-EOS, forces EOS at the last position,
never emits PAD, and picks the best finished hypothesis. What differs is mechanics only:

- The cross-attention reads a 1-token memory (the sentence embedding), so its softmax is exactly
  1 and its output, `out_proj(v_proj(embedding))`, is the same at every step: it is computed
  once per beam when the beam is added, and every row of the beam reads it.
- Self-attention keys and values live in pages of a `models.paged.PagePool` (the memory budget
  the SONAR-LLM's KV cache draws on too). A block is one page viewed as
  `[layers, 2, block_positions, H, head_dim]`; each row has a block table (its pages, in order)
  and a length, both on the host. Each step writes every row's keys and values at its (page,
  offset) and gathers the rows' blocks per layer for attention (rows at different positions
  attend through a length mask). A beam's children share their parent's full blocks (reference
  counts); the parent's partly filled last block goes on with its first child and is copied for
  the others. Nothing grows by copying and nothing is copied whole: a row takes one (zeroed)
  page when it crosses a block boundary, and gives its pages back when it leaves. A beam never
  holds more than `DecodeBatch.pages_for` pages, which is what the engine reserves for it.
- A step whose batched forward raises is run again beam by beam (rewriting the same keys and
  values at the same places); the beams that still raise fail alone, as do beams whose
  log-probabilities come out NaN.
- A prefix of more than two tokens is fed one token per step, where fairseq2 prefills it in one
  chunk (the same arithmetic up to rounding); SONAR's prefix is `</s> __lang__`, one prefill step.
- The scores of hypotheses agree with fairseq2's to float rounding, not bit for bit: batched
  matrix products round differently with the batch's shape (fairseq2's own do too).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from models.paged import PagePool, blocks_for, page_bytes_for

log = logging.getLogger("sonar_llm.decoder")


class UnsupportedDecoder(ValueError):
    """The decoder's architecture is not the SONAR one this search implements."""


@dataclass
class DecodedSeq:
    """One finished sentence: its tokens (without the prefix, ending with EOS) and score."""

    tokens: list[int]
    score: float


@dataclass(frozen=True)
class BeamRequest:
    """One embedding to decode: `max_seq_len` bounds the whole sequence, prefix included."""

    key: Hashable
    embedding: Tensor
    prefix: Sequence[int]  # forced first tokens, e.g. `</s> __lang__`
    beam_size: int
    max_seq_len: int


@dataclass
class StepResult:
    finished: list[tuple[Hashable, DecodedSeq]] = field(default_factory=list)
    failed: list[tuple[Hashable, str]] = field(default_factory=list)  # (key, why)


@dataclass
class _Beam:
    key: Hashable
    beam_size: int
    max_seq_len: int  # cap on the whole sequence, prefix included (fairseq2's max_seq_len)
    prefix: list[int]
    slot: int  # the row of `DecodeBatch._cross` holding this beam's cross-attention term
    pages: int  # `DecodeBatch.pages_for` this beam: the most pages it ever holds
    # Per live row of this beam (1 row until the prefix is done): its tokens, its cumulative
    # score (an fp32 value) and its block table. Every row of a beam is at the same position,
    # and a row's cache holds positions 0..len(tokens)-2 (the last token is fed next).
    seqs: list[list[int]]
    scores: list[float]
    tables: list[list[int]]
    hyps: list[DecodedSeq] = field(default_factory=list)
    row0: int = 0  # this beam's first row in the current step's batch

    @property
    def length(self) -> int:
        return len(self.seqs[0])


Fn = Callable[[Tensor], Tensor]


def _linear(m: torch.nn.Module) -> Fn:
    """`m` as a plain `F.linear` call when it is an unsharded linear layer (the same arithmetic
    without the module-call overhead), else the module itself."""
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    if type(m).__name__ in _PLAIN_LINEAR and not getattr(m, "sharded", False) and w is not None:
        return lambda x: F.linear(x, w, b)
    return m


def _layer_norm(m: torch.nn.Module) -> Fn:
    if type(m).__name__ == "StandardLayerNorm" and not getattr(m, "cast_fp32", True):
        shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
        return lambda x: F.layer_norm(x, shape, w, b, eps)  # type: ignore[arg-type]
    return m


def _ffn(m: torch.nn.Module) -> Fn:
    """fairseq2's `StandardFeedForwardNetwork` in eval mode: inner, activation, output."""
    if type(m).__name__ != "StandardFeedForwardNetwork" or getattr(m, "inner_layer_norm", None):
        return m
    inner, out = _linear(m.inner_proj), _linear(m.output_proj)  # type: ignore[arg-type]
    act = m.inner_activation
    if isinstance(act, torch.nn.ReLU):
        return lambda x: out(F.relu(inner(x)))
    return lambda x: out(act(inner(x)))  # type: ignore[operator]


_PLAIN_LINEAR = {"Linear", "ColumnShardedLinear", "RowShardedLinear"}


@dataclass(frozen=True)
class _Layer:
    self_norm: Fn
    q: Fn
    k: Fn
    v: Fn
    out: Fn
    ffn_norm: Fn
    ffn: Fn


class SonarDecoderStack:
    """The SONAR text decoder's weights, run one token per row with an external cache."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        _check_architecture(decoder)
        d: Any = decoder  # fairseq2's modules: their attributes are checked above
        self.frontend: Any = d.decoder_frontend
        self.blocks = list(d.decoder.layers)
        self.layers = [
            _Layer(
                self_norm=_layer_norm(m.self_attn_layer_norm),
                q=_linear(m.self_attn.q_proj),
                k=_linear(m.self_attn.k_proj),
                v=_linear(m.self_attn.v_proj),
                out=_linear(m.self_attn.output_proj),
                ffn_norm=_layer_norm(m.ffn_layer_norm),
                ffn=_ffn(m.ffn),
            )
            for m in self.blocks
        ]
        self.final_norm = _layer_norm(d.decoder.layer_norm)
        self.final_proj = d.final_proj
        self.post_sentemb_proj = getattr(d, "post_sentemb_proj", None)
        attn = self.blocks[0].self_attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.num_layers = len(self.blocks)
        self.max_positions = int(self.frontend.pos_encoder.max_seq_len)
        self.max_target_seq_len = int(getattr(d, "max_target_seq_len", self.max_positions))
        embed: Tensor = self.frontend.embed.weight
        self.device: torch.device = embed.device
        self.dtype: torch.dtype = embed.dtype
        self.vocab_size = int(embed.shape[0])
        self.model_dim = int(embed.shape[1])

    def bytes_per_position(self) -> int:
        """Self-attention cache bytes one position of one row takes: keys and values, all layers."""
        return self.num_layers * 2 * self.num_heads * self.head_dim * self.dtype.itemsize

    def cross_attention(self, memory: Tensor) -> Tensor:
        """[N, E] embeddings → [N, layers, model_dim]: each layer's cross-attention term."""
        mem = memory.to(device=self.device, dtype=self.dtype)
        if self.post_sentemb_proj is not None:
            mem = self.post_sentemb_proj(mem)
        # Attention over a single key: the weights are exactly 1 and the output is its value.
        return torch.stack(
            [
                m.encoder_decoder_attn.output_proj(m.encoder_decoder_attn.v_proj(mem))
                for m in self.blocks
            ],
            dim=1,
        )

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        length: int,
        kv: Tensor,
        write_pages: Tensor,
        write_offsets: Tensor,
        tables: Tensor,
        cross: Tensor,
        uniform: bool,
        scratch: Tensor | None = None,
    ) -> Tensor:
        """Log-probabilities [N, V] (fp32) for the next token of each row.

        `tokens`/`positions` [N], `length` = max(positions) + 1 (known on the host: no device
        sync); `kv` [pages, layers, 2, block_positions, H, head_dim] is the page pool's view;
        row r's keys and values of this step go to page `write_pages[r]` at offset
        `write_offsets[r]`, and it attends over the blocks `tables[r]` ([N, blocks], blocks ×
        block_positions >= length, padded with pages of its own); `uniform` says every row is at
        the same position. `scratch`, if given, receives each layer's gathered keys and values
        (at least 2 × N × blocks × block_positions × H × head_dim elements of the cache dtype):
        reusing it spares an allocation per layer.
        """
        fe = self.frontend
        x = fe.embed(tokens.unsqueeze(1))
        if fe.scale != 1.0:
            x = x * fe.scale
        # Position p reads row p + 1 of the table (row 0 is for padding).
        freqs = fe.pos_encoder.freqs[positions + 1]
        x = (x.float() + freqs.unsqueeze(1)).type_as(x)
        n = tokens.shape[0]
        if uniform:
            mask = None
        else:
            # Row r sees its own positions 0..positions[r].
            mask = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None]).view(
                n, 1, 1, length
            )
        heads, head_dim = self.num_heads, self.head_dim
        read = tables.reshape(-1)
        span = tables.shape[1] * kv.shape[3]  # positions the gathered blocks cover
        gathered = (read.shape[0], *kv.shape[3:])
        size = read.shape[0] * kv[0, 0, 0].numel()
        out_k = out_v = None
        if scratch is not None:
            out_k = scratch[:size].view(gathered)
            out_v = scratch[size : 2 * size].view(gathered)
        for i, layer in enumerate(self.layers):
            h = layer.self_norm(x)
            q = layer.q(h).view(n, 1, heads, head_dim).transpose(1, 2)
            k = layer.k(h).view(n, heads, head_dim)
            v = layer.v(h).view(n, heads, head_dim)
            kc, vc = kv[:, i, 0], kv[:, i, 1]  # [pages, block_positions, H, head_dim]
            kc[write_pages, write_offsets] = k
            vc[write_pages, write_offsets] = v
            # [N × blocks, block_positions, H, head_dim] → [N, H, length, head_dim]
            if out_k is not None and out_v is not None:
                keys = torch.index_select(kc, 0, read, out=out_k).view(n, span, heads, head_dim)
                values = torch.index_select(vc, 0, read, out=out_v).view(n, span, heads, head_dim)
            else:
                keys = kc.index_select(0, read).view(n, span, heads, head_dim)
                values = vc.index_select(0, read).view(n, span, heads, head_dim)
            keys = keys[:, :length].transpose(1, 2)
            values = values[:, :length].transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = layer.out(attn.transpose(1, 2).flatten(-2, -1)) + x
            x = cross[:, i : i + 1] + x
            x = layer.ffn(layer.ffn_norm(x)) + x
        logits = self.final_proj(self.final_norm(x))
        return F.log_softmax(logits, dim=-1, dtype=torch.float32).squeeze(1)


_PRECISION = {
    torch.bfloat16: "medium",
    torch.float16: "medium",
    torch.float32: "high",
    torch.float64: "highest",
}


@contextlib.contextmanager
def _matmul_precision(dtype: torch.dtype) -> Iterator[None]:
    """The float32 matmul precision SONAR's pipelines decode under (TF32 allowed on GPUs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_PRECISION.get(dtype, "high"))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _check_architecture(decoder: torch.nn.Module) -> None:
    """Refuse decoders that are not the SONAR architecture (fairseq2 then decodes them)."""
    from fairseq2.models.transformer import (
        StandardMultiheadAttention,
        StandardTransformerDecoderLayer,
        TransformerEmbeddingFrontend,
        TransformerNormOrder,
    )
    from fairseq2.models.transformer.attention_bias import CausalAttentionBias, IdentityBias
    from fairseq2.models.transformer.sdpa.torch import TorchSDPA
    from fairseq2.nn import SinusoidalPositionEncoder

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise UnsupportedDecoder(f"SONAR decoder: {what}")

    fe = getattr(decoder, "decoder_frontend", None)
    need(isinstance(fe, TransformerEmbeddingFrontend), "frontend is not an embedding frontend")
    need(getattr(fe, "layer_norm", None) is None, "frontend layer norm")
    need(isinstance(getattr(fe, "pos_encoder", None), SinusoidalPositionEncoder), "positions")
    layers = list(getattr(getattr(decoder, "decoder", None), "layers", []))
    need(bool(layers), "no decoder layers")
    for layer in layers:
        need(isinstance(layer, StandardTransformerDecoderLayer), "layer type")
        need(layer.norm_order == TransformerNormOrder.PRE, "norm order is not pre-norm")
        for name, bias in (
            ("self_attn", CausalAttentionBias),
            ("encoder_decoder_attn", IdentityBias),
        ):
            attn = getattr(layer, name)
            need(isinstance(attn, StandardMultiheadAttention), f"{name} type")
            need(attn.num_key_value_heads == attn.num_heads, f"{name} grouped-query attention")
            need(
                attn.q_norm is None
                and attn.k_norm is None
                and attn.v_norm is None
                and attn.pos_encoder is None,
                f"{name} q/k/v norms or rotary positions",
            )
            sdpa = attn.sdpa
            need(isinstance(sdpa, TorchSDPA) and sdpa.scale is None, f"{name} attention kernel")
            need(isinstance(sdpa.bias, bias), f"{name} attention bias")
            if name == "self_attn":
                need(sdpa.bias.attn_window_len is None, "sliding-window attention")
        need(layer.encoder_decoder_attn_layer_norm is not None, "cross-attention layer norm")
    need(getattr(decoder.decoder, "layer_norm", None) is not None, "final layer norm")  # type: ignore[union-attr]


class DecodeBatch:
    """A persistent batch of beam searches over one SONAR decoder; see the module docstring.

    The self-attention cache lives in pages of `pool` (tagged `owner`), a block of
    `block_positions` positions per page. With no pool the batch keeps a private one, sized to
    `pages_for` of the beams it holds (grown, by a copy, when more join while others run) and
    dropped when the batch empties. Not thread-safe: one owner (the engine thread, or one
    `decode` call) drives it.
    """

    def __init__(
        self,
        stack: SonarDecoderStack,
        eos_idx: int,
        pad_idx: int | None,
        pool: PagePool | None = None,
        owner: str = "decoder",
    ) -> None:
        self.stack = stack
        self.eos = eos_idx
        self.pad = pad_idx
        self.device = stack.device
        self.owner = owner
        self._bytes_per_position = stack.bytes_per_position()
        self._private = pool is None
        page_bytes = (
            pool.page_bytes if pool is not None else page_bytes_for([self._bytes_per_position])
        )
        self._block = page_bytes // self._bytes_per_position
        if self._block < 1:
            raise ValueError(
                f"a page of {page_bytes} B cannot hold one decoder position "
                f"({self._bytes_per_position} B)"
            )
        if pool is not None and pool.device.type != self.device.type:
            raise ValueError(f"the page pool is on {pool.device}, the decoder on {self.device}")
        self._page_bytes = page_bytes
        self.pool: PagePool | None = pool
        self._kv: Tensor | None = None  # the pool's pages as blocks
        self._view()
        self._beams: list[_Beam] = []
        self._pages = 0  # distinct pages this batch holds
        self._reserved = 0  # sum of `pages_for` over the beams it holds
        self._cross = torch.zeros(
            (0, stack.num_layers, stack.model_dim), device=self.device, dtype=stack.dtype
        )
        self._free_slots: list[int] = []
        # Where the forward gathers each layer's keys and values (one layer's worth, reused).
        self._scratch = torch.empty(0, dtype=stack.dtype, device=self.device)
        self.tokens_stepped = 0  # row-steps run, for throughput accounting

    # ----- pages ---------------------------------------------------------------------------
    @property
    def block_positions(self) -> int:
        """Positions per block (one pool page)."""
        return self._block

    @staticmethod
    def pages_for(beam_size: int, max_seq_len: int, block_positions: int) -> int:
        """The most pages one beam search holds at any moment, a step's transients included.

        A row's cache holds at most `max_seq_len - 1` positions (the last token, EOS, is never
        fed back), so a row's block table has at most B = ceil((max_seq_len - 1) / block) pages,
        and a beam has at most `beam_size` rows: `beam_size × B` pages. The step never goes
        above it: (1) the block a row takes at a boundary is one of its B; (2) at the fork the
        rows that do not continue give their pages back first; then d continuing parents keep
        at most B pages each, their children share the full blocks and the first child goes on
        in the parent's last block, and each of the other (at most `beam_size - d`) children
        takes one page for its copy of that block: d × B + (beam_size - d) <= beam_size × B.
        """
        return beam_size * blocks_for(max(max_seq_len - 1, 1), block_positions)

    @property
    def reserved_pages(self) -> int:
        """Sum of `pages_for` over the beams in the batch."""
        return self._reserved

    def _view(self) -> None:
        st = self.stack
        shape = (st.num_layers, 2, self._block, st.num_heads, st.head_dim)
        self._kv = self.pool.view(st.dtype, shape) if self.pool is not None else None

    def _reserve_private(self, pages: int) -> None:
        """Make the private pool hold `pages` (the beams' reservations) at least."""
        if not self._private:
            return
        if self.pool is None:
            self.pool = PagePool(pages, self._page_bytes, self.device)
        elif self.pool.num_pages < pages:
            self.pool.grow(max(pages, 2 * self.pool.num_pages))
        else:
            return
        self._view()

    def _alloc(self, n: int) -> list[int]:
        assert self.pool is not None
        pages = self.pool.alloc(n, self.owner)
        self._pages += n
        return pages

    def _release(self, pages: list[int]) -> None:
        if not pages:
            return
        pool = self.pool
        assert pool is not None
        pool.release(pages)
        self._pages -= sum(1 for p in pages if pool.refcount(p) == 0)

    def _leave(self, b: _Beam) -> None:
        """Give back everything `b` holds (its rows' pages, its cross-attention slot)."""
        for table in b.tables:
            self._release(table)
        b.tables = [[] for _ in b.tables]
        self._free_slots.append(b.slot)
        self._reserved -= b.pages

    def _idle(self) -> None:
        """An empty batch holds no memory (a private pool goes; a shared one got its pages)."""
        assert self._pages == 0 and self._reserved == 0
        if self._private:
            self.pool = None
            self._kv = None
        self._cross = self._cross.new_zeros((0, *self._cross.shape[1:]))
        self._free_slots = []
        self._scratch = self._scratch.new_empty(0)

    # ----- membership ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._beams)

    @property
    def num_rows(self) -> int:
        return sum(len(b.seqs) for b in self._beams)

    def members(self) -> list[Hashable]:
        return [b.key for b in self._beams]

    def cache_bytes(self) -> int:
        """Bytes of the pages this batch holds (host-side accounting, no device sync)."""
        return self._pages * self._page_bytes

    def used_bytes(self) -> int:
        """Bytes of the positions its rows hold, a position shared by sibling rows counted once.

        Every block but a row's last is full, and a partly filled last block is the row's own,
        so the positions are the pages' minus the empty tails of the rows' last blocks.
        """
        bp = self._block
        positions = self._pages * bp
        for b in self._beams:
            tail = (b.length - 1) % bp
            if tail:
                positions -= (bp - tail) * len(b.seqs)
        return positions * self._bytes_per_position

    def check(self, r: BeamRequest) -> None:
        """Raise ValueError if `r` cannot be decoded by this batch."""
        if r.beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        if 2 * r.beam_size > self.stack.vocab_size:
            raise ValueError("beam_size is too large for the vocabulary")
        if not r.prefix:
            raise ValueError("the prefix must not be empty")
        if len(r.prefix) >= r.max_seq_len:
            raise ValueError(f"max_seq_len {r.max_seq_len} leaves no room after the prefix")
        if r.max_seq_len > self.stack.max_positions:
            raise ValueError(
                f"max_seq_len {r.max_seq_len} is beyond the decoder's {self.stack.max_positions}"
            )

    @torch.inference_mode()
    def add(self, requests: list[BeamRequest]) -> None:
        """Start decoding each request's embedding after its forced prefix, from the next step.

        A shared pool's pages are the caller's to reserve (`pages_for` each request); a private
        pool is sized here.
        """
        if not requests:
            return
        for r in requests:
            self.check(r)
        pages = [self.pages_for(r.beam_size, r.max_seq_len, self._block) for r in requests]
        self._reserve_private(self._reserved + sum(pages))
        with _matmul_precision(self.stack.dtype):
            cross = self.stack.cross_attention(
                torch.stack([r.embedding.reshape(-1) for r in requests])
            )
        slots = self._slots(len(requests))
        self._cross[torch.tensor(slots, dtype=torch.long, device=self.device)] = cross
        for r, slot, n in zip(requests, slots, pages, strict=True):
            self._beams.append(
                _Beam(
                    r.key,
                    r.beam_size,
                    r.max_seq_len,
                    list(r.prefix),
                    slot,
                    n,
                    seqs=[[r.prefix[0]]],
                    scores=[0.0],
                    tables=[[]],
                )
            )
            self._reserved += n

    def _slots(self, n: int) -> list[int]:
        """`n` free rows of `_cross` (growing it by doubling)."""
        if len(self._free_slots) < n:
            have = self._cross.shape[0]
            grown = max(have + n - len(self._free_slots), 2 * have, 16)
            cross = self._cross.new_zeros((grown, *self._cross.shape[1:]))
            cross[:have] = self._cross
            self._cross = cross
            self._free_slots += range(grown - 1, have - 1, -1)
        return [self._free_slots.pop() for _ in range(n)]

    @torch.inference_mode()
    def remove(self, keys: set[Hashable]) -> None:
        """Drop the beams of `keys` (cancelled) with their rows and pages."""
        if any(b.key in keys for b in self._beams):
            for b in self._beams:
                if b.key in keys:
                    self._leave(b)
            self._beams = [b for b in self._beams if b.key not in keys]
            if not self._beams:
                self._idle()

    # ----- one token for every row ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Advance every row one token: the beams that finished (best hypothesis each), and the
        beams that failed (NaN log-probabilities, a forward that raised, no page to be had),
        dropped with their pages while the others go on."""
        result = StepResult()
        if not self._beams:
            return result
        failed: dict[int, str] = {}  # id(beam) → why
        self._new_blocks(failed)
        live = [b for b in self._beams if id(b) not in failed]
        lprobs: Tensor | None = None
        if live:
            lprobs = self._forward(live, failed)
        if failed:
            for b in self._beams:
                if id(b) in failed:
                    result.failed.append((b.key, failed[id(b)]))
                    self._leave(b)
            self._beams = [b for b in self._beams if id(b) not in failed]
        if lprobs is None or not self._beams:
            if not self._beams:
                self._idle()
            return result
        dev = self.device

        # Rows still in their prefix take the forced token; the others search.
        forced: list[_Beam] = []
        eos_only: list[int] = []
        groups: dict[tuple[int, int], list[_Beam]] = {}
        for b in self._beams:
            if b.length < len(b.prefix):
                forced.append(b)
            else:
                groups.setdefault((len(b.seqs), b.beam_size), []).append(b)
                if b.length == b.max_seq_len - 1:
                    eos_only.extend(range(b.row0, b.row0 + len(b.seqs)))
        if self.pad is not None:
            lprobs[:, self.pad] = -torch.inf
        if eos_only:
            rows_t = torch.tensor(eos_only, dtype=torch.long, device=dev)
            keep_eos = lprobs[rows_t, self.eos].clone()
            lprobs[rows_t] = -torch.inf
            lprobs[rows_t, self.eos] = keep_eos

        scores = torch.tensor(
            [s for b in live for s in b.scores], dtype=torch.float32, device=dev
        )  # by row, failed beams' rows included (their lprobs rows are zeros)
        forced_scores: list[float] = []
        if forced:
            fr = torch.tensor([b.row0 for b in forced], dtype=torch.long, device=dev)
            ft = torch.tensor([b.prefix[b.length] for b in forced], dtype=torch.long, device=dev)
            forced_scores = (scores[fr] + lprobs[fr, ft]).tolist()
        # Candidates of all searching beams of the same shape in one topk (one host sync).
        vocab = lprobs.shape[1]
        picks: dict[int, tuple[list[float], list[int]]] = {}
        for (rows, beam_size), members in groups.items():
            idx = torch.tensor(
                [list(range(b.row0, b.row0 + rows)) for b in members], dtype=torch.long, device=dev
            )
            cand = lprobs[idx] + scores[idx].unsqueeze(-1)  # [G, rows, V]
            top = torch.topk(cand.view(len(members), -1), k=min(2 * beam_size, vocab))
            for b, val, ind in zip(members, top.values.tolist(), top.indices.tolist(), strict=True):
                picks[id(b)] = (val, ind)

        # Each continuing beam with its new rows' tokens, their parents (rows of the beam) and
        # their cumulative scores.
        plan: list[tuple[_Beam, list[list[int]], list[int], list[float]]] = []
        for b, score in zip(forced, forced_scores, strict=True):
            plan.append((b, [b.seqs[0] + [b.prefix[b.length]]], [0], [score]))
        for b in self._beams:
            if id(b) not in picks:
                continue
            values, indices = picks[id(b)]
            step_nr = b.length
            done = False
            for score, flat in zip(values[: b.beam_size], indices[: b.beam_size], strict=True):
                if flat % vocab != self.eos:
                    continue
                row = flat // vocab
                norm = float(np.float32(score) / np.float32(step_nr))
                b.hyps.append(DecodedSeq([*b.seqs[row][len(b.prefix) :], self.eos], norm))
                if len(b.hyps) == b.beam_size:
                    done = True
                    break
            if done or step_nr == b.max_seq_len - 1:
                # Best first; ties keep the order they were found in (a stable sort). (After
                # the forced-EOS step every beam is done; the second test is a safety net.)
                b.hyps.sort(key=lambda h: h.score, reverse=True)
                if b.hyps:
                    result.finished.append((b.key, b.hyps[0]))
                else:
                    result.failed.append((b.key, "the beam search ended without a hypothesis"))
                self._leave(b)
                continue
            seqs: list[list[int]] = []
            parents: list[int] = []
            new_scores: list[float] = []
            for score, flat in zip(values, indices, strict=True):
                tok = flat % vocab
                if tok == self.eos:
                    continue
                row = flat // vocab
                seqs.append(b.seqs[row] + [tok])
                parents.append(row)
                new_scores.append(score)
                if len(seqs) == b.beam_size:
                    break
            plan.append((b, seqs, parents, new_scores))
        self._beams = [b for b, _, _, _ in plan]
        self._fork(plan, result)
        if not self._beams:
            self._idle()
        return result

    def _new_blocks(self, failed: dict[int, str]) -> None:
        """A fresh (zeroed) page for every row about to write the first position of a block."""
        assert self.pool is not None
        bp = self._block
        fresh: list[int] = []
        for b in self._beams:
            p = b.length - 1  # the position every row of `b` writes this step
            if p % bp:
                continue
            if self.pool.free_pages < len(b.seqs):
                failed[id(b)] = "the decoder's cache has no free page (pages were not reserved)"
                continue
            pages = self._alloc(len(b.seqs))
            for table, page in zip(b.tables, pages, strict=True):
                table.append(page)
            fresh += pages
        if fresh:
            # No stale bytes (another cache's, or NaN patterns) under masked positions.
            assert self._kv is not None
            self._kv.index_fill_(0, torch.tensor(fresh, dtype=torch.long, device=self.device), 0)

    def _scratch_for(self, numel: int) -> Tensor:
        """A buffer of `numel` cache elements for the forward's gathers, kept across steps."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(
                max(numel, self._scratch.numel() * 5 // 4),
                dtype=self.stack.dtype,
                device=self.device,
            )
        return self._scratch

    def _forward(self, beams: list[_Beam], failed: dict[int, str]) -> Tensor:
        """Log-probabilities [rows, V] of `beams`' rows (each beam's from `row0` on); if the
        batched forward raises, each beam's rows run alone and the beams that still raise go to
        `failed` (their rows' log-probabilities are zeros). Beams with NaN log-probabilities go
        to `failed` too."""
        bp = self._block
        tokens: list[int] = []
        positions: list[int] = []
        pages: list[int] = []
        offsets: list[int] = []
        slots: list[int] = []
        n = 0
        for b in beams:
            b.row0 = n
            n += len(b.seqs)
        length = max(b.length for b in beams)  # max(position) + 1
        uniform = min(b.length for b in beams) == length
        width = blocks_for(length, bp)
        tables: list[int] = []
        for b in beams:
            p = b.length - 1
            block, offset = divmod(p, bp)
            for seq, table in zip(b.seqs, b.tables, strict=True):
                tokens.append(seq[-1])
                pages.append(table[block])
                tables += table
                tables += [table[-1]] * (width - len(table))  # masked out: any page of its own
            positions += [p] * len(b.seqs)
            offsets += [offset] * len(b.seqs)
            slots += [b.slot] * len(b.seqs)
        # One host-to-device copy for every index of the step.
        idx = torch.tensor(
            tokens + positions + pages + offsets + slots + tables, dtype=torch.long
        ).to(self.device)
        tok_t, pos_t, page_t, off_t, slot_t = idx[: 5 * n].view(5, n)
        table_t = idx[5 * n :].view(n, width)
        cross = self._cross[slot_t]
        kv = self._kv
        assert kv is not None
        scratch = self._scratch_for(2 * n * width * kv[0, 0, 0].numel())
        try:
            with _matmul_precision(self.stack.dtype):
                lprobs = self.stack.forward(
                    tok_t, pos_t, length, kv, page_t, off_t, table_t, cross, uniform, scratch
                )
        except Exception:
            log.exception("the batched decoder step failed; retrying beam by beam")
            parts: list[Tensor | None] = []
            for b in beams:
                rows = slice(b.row0, b.row0 + len(b.seqs))
                try:
                    with _matmul_precision(self.stack.dtype):
                        part = self.stack.forward(
                            tok_t[rows],
                            pos_t[rows],
                            b.length,
                            kv,
                            page_t[rows],
                            off_t[rows],
                            table_t[rows, : blocks_for(b.length, bp)],
                            cross[rows],
                            True,
                            scratch,
                        )
                except Exception as e:
                    failed[id(b)] = f"the SONAR decoder failed: {type(e).__name__}: {e}"
                    part = None
                parts.append(part)
            vocab = next((p.shape[1] for p in parts if p is not None), self.stack.vocab_size)
            lprobs = torch.cat(
                [
                    p
                    if p is not None
                    else torch.zeros((len(b.seqs), vocab), dtype=torch.float32, device=kv.device)
                    for b, p in zip(beams, parts, strict=True)
                ]
            )
        self.tokens_stepped += n
        nan_rows = lprobs.isnan().any(dim=-1)
        if bool(nan_rows.any()):
            bad = set(torch.nonzero(nan_rows).flatten().tolist())
            for b in beams:
                if bad.intersection(range(b.row0, b.row0 + len(b.seqs))):
                    failed.setdefault(id(b), "the SONAR decoder produced NaN log-probabilities")
            lprobs[nan_rows] = 0.0  # those rows are dropped; keep the arithmetic clean
        return lprobs

    def _fork(
        self,
        plan: list[tuple[_Beam, list[list[int]], list[int], list[float]]],
        result: StepResult,
    ) -> None:
        """Give each planned row its block table. A parent's first child goes on in its pages;
        the others share its full blocks and copy its partly filled last one; parents without
        children give their pages back (first, so a beam stays within `pages_for`)."""
        assert self.pool is not None
        bp = self._block
        src: list[int] = []
        dst: list[int] = []
        failed: set[int] = set()
        for b, seqs, parents, scores in plan:
            held = b.length  # positions each parent holds now: 0..length-1
            full, partial = divmod(held, bp)
            old = b.tables
            continuing = set(parents)
            for r, table in enumerate(old):
                if r not in continuing:
                    self._release(table)
            copies = len(parents) - len(continuing) if partial else 0
            if self.pool.free_pages < copies:
                b.tables = [old[r] for r in continuing]
                self._leave(b)
                failed.add(id(b))
                result.failed.append(
                    (b.key, "the decoder's cache has no free page (pages were not reserved)")
                )
                continue
            taken = [False] * len(old)
            tables: list[list[int]] = []
            for parent in parents:
                table = old[parent]
                if not taken[parent]:
                    taken[parent] = True
                    tables.append(table)
                    continue
                shared = table[:full]
                self.pool.share(shared)  # shared pages are counted once in `_pages`
                if partial:
                    (page,) = self._alloc(1)
                    src.append(table[full])
                    dst.append(page)
                    shared = [*shared, page]
                tables.append(shared)
            b.seqs, b.scores, b.tables = seqs, scores, tables
        if failed:
            self._beams = [b for b in self._beams if id(b) not in failed]
        if src:
            kv = self._kv
            assert kv is not None
            kv.index_copy_(
                0,
                torch.tensor(dst, dtype=torch.long, device=self.device),
                kv.index_select(0, torch.tensor(src, dtype=torch.long, device=self.device)),
            )


def decode_all(batch: DecodeBatch, requests: list[BeamRequest]) -> list[DecodedSeq]:
    """Decode `requests` to completion; results in request order. (A batch without a pool of
    its own gets a private one of exactly the requests' `pages_for`.)"""
    batch.add(requests)
    out: dict[Hashable, DecodedSeq] = {}
    while len(batch):
        result = batch.step()
        if result.failed:
            raise FloatingPointError(result.failed[0][1])
        out.update(result.finished)
    return [out[r.key] for r in requests]
