"""Batched incremental beam search for the SONAR text decoder, rows joining and leaving any step.

fairseq2's `BeamSearchSeq2SeqGenerator` (what the reference decodes with) runs one call per batch:
every embedding starts together and the call lasts as long as its longest sentence, and each
step rebuilds batch layouts and attention state in Python. This module runs the same search over
the same decoder weights as a persistent batch: `DecodeBatch.add()` puts an embedding in at any
step, `step()` advances every row by one token and returns the sentences that ended. The engine
keeps the decoder busy at token level; `SonarCodec.decode` uses it as a drop-in for one batch.
The weights are a `models.sonar.decoder.SonarTextDecoder` (plain PyTorch; a fairseq2 decoder's
tensors are handed to one), so nothing here needs fairseq2.

Sampled sentences (`BeamRequest.sampling`) are rows of the same batch: a beam of one whose
candidate each step is a draw from its row's distribution (`models.sampling`: temperature,
top-k, top-p, PAD never, EOS forced at the length cap as for beams), from a random stream of its
own, so a seeded sentence is the same whatever decodes beside it.

The search is fairseq2's, decision for decision (`tests/models/test_beam_search.py` compares the
two): the target prefix (`</s> __lang__`) is forced and scored, each step takes the best
2 × beam candidates of the flattened beam, finishes EOS among the first `beam` of them (score
normalised by length), continues with the first `beam` non-EOS, forces EOS at the last position,
never emits PAD, and picks the best finished hypothesis. What differs is mechanics only:

- The cross-attention reads a 1-token memory (the sentence embedding), so its softmax is exactly
  1 and its output, `out_proj(v_proj(embedding))`, is the same at every step: it is computed
  once per beam when the beam is added, and every row of the beam reads it.
- Self-attention keys and values live in pages of the `models.block_manager.BlockManager`
  (the memory budget the SONAR-LLM's KV cache draws on too). A block is one page viewed as
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

from models.block_manager import BlockManager, blocks_for, page_bytes_for
from models.sampling import RowSampler, Sampling, draw_params, sample_tokens
from models.sonar.decoder import FeedForward, SonarTextDecoder, UnsupportedDecoder

log = logging.getLogger("sonar_llm.decoder")


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
    # Set: sample each token instead of searching (one row; `beam_size` must be 1).
    sampling: Sampling | None = None


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
    # Every row of a beam is at the same position: each has `length` tokens and its cache holds
    # positions 0..length-2 (the last token is fed next). 1 row until the prefix is done.
    length: int = 1
    rows: int = 1
    hyps: list[DecodedSeq] = field(default_factory=list)
    sampler: RowSampler | None = None  # a sampled sentence's settings and random stream


Fn = Callable[[Tensor], Tensor]


def _linear(m: torch.nn.Linear) -> Fn:
    """`m` as a plain `F.linear` call: the same arithmetic without the module-call overhead."""
    w, b = m.weight, m.bias
    return lambda x: F.linear(x, w, b)


def _layer_norm(m: torch.nn.LayerNorm) -> Fn:
    shape, w, b, eps = m.normalized_shape, m.weight, m.bias, m.eps
    return lambda x: F.layer_norm(x, shape, w, b, eps)


def _ffn(m: FeedForward) -> Fn:
    inner, out = _linear(m.inner_proj), _linear(m.output_proj)
    return lambda x: out(F.relu(inner(x)))


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

    def __init__(self, decoder: SonarTextDecoder) -> None:
        _check_config(decoder)
        self.decoder = decoder
        self.blocks = decoder.layers
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
            for m in decoder.layers
        ]
        self.final_norm = _layer_norm(decoder.decoder.layer_norm)
        self.final_proj = decoder.final_proj
        self.num_heads = decoder.num_heads
        self.head_dim = decoder.model_dim // decoder.num_heads
        self.num_layers = decoder.num_layers
        # The position table's length bounds a sequence; SONAR's generators take the same bound.
        self.max_positions = decoder.max_seq_len
        self.max_target_seq_len = decoder.max_seq_len
        embed = decoder.embed_weight
        self.device: torch.device = embed.device
        self.dtype: torch.dtype = embed.dtype
        self.vocab_size = decoder.vocab_size
        self.model_dim = decoder.model_dim

    def bytes_per_position(self) -> int:
        """Self-attention cache bytes one position of one row takes: keys and values, all layers."""
        return self.num_layers * 2 * self.num_heads * self.head_dim * self.dtype.itemsize

    def cross_attention(self, memory: Tensor) -> Tensor:
        """[N, E] embeddings → [N, layers, model_dim]: each layer's cross-attention term."""
        return self.decoder.cross_attention(memory.to(device=self.device, dtype=self.dtype))

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
        x = self.decoder.embed(tokens.unsqueeze(1), positions.unsqueeze(1))
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
def matmul_precision(dtype: torch.dtype) -> Iterator[None]:
    """The float32 matmul precision sonar-space's pipelines run under (TF32 allowed on GPUs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_PRECISION.get(dtype, "high"))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _check_config(decoder: SonarTextDecoder) -> None:
    """Refuse a decoder whose shape the paged step cannot run."""
    if not isinstance(decoder, SonarTextDecoder):
        raise UnsupportedDecoder(f"expected a SonarTextDecoder, got {type(decoder).__name__}")
    if decoder.model_dim % decoder.num_heads or decoder.model_dim % 2:
        raise UnsupportedDecoder(
            f"model_dim {decoder.model_dim} must be even and a multiple of "
            f"{decoder.num_heads} heads"
        )
    if decoder.max_seq_len < 2 or decoder.num_layers < 1:
        raise UnsupportedDecoder("a decoder needs layers and at least 2 positions")


class DecodeBatch:
    """A persistent batch of beam searches over one SONAR decoder; see the module docstring.

    The self-attention cache lives in pages of `pool` (tagged `owner`), a block of
    `block_positions` positions per page. With no pool the batch keeps a private one, sized to
    `pages_for` of the beams it holds (grown, by a copy, when more join while others run) and
    dropped when the batch empties. Not thread-safe: one owner (the engine thread, or one
    `decode` call) drives it.

    State by row (the rows of each beam contiguous, beams in order): on the device the token
    each row feeds next and its cumulative score; on the host (NumPy) its block table and its
    tokens so far. On a GPU a step decides on the device and brings back one small array; on
    a CPU it applies the same rules to NumPy views of the candidates (`DECIDE_ON_HOST`). The
    beams are kept ordered by row count (most first), which `_choose` relies on for speed only.
    """

    def __init__(
        self,
        stack: SonarDecoderStack,
        eos_idx: int,
        pad_idx: int | None,
        pool: BlockManager | None = None,
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
        self.pool: BlockManager | None = pool
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
        self._empty_rows()
        self.tokens_stepped = 0  # row-steps run, for throughput accounting
        # Where `_choose` applies the search's rules (see `step`); DECIDE_ON_HOST overrides it.
        self._decide_on_host = (
            self.device.type == "cpu" if DECIDE_ON_HOST is None else DECIDE_ON_HOST
        )

    def _empty_rows(self) -> None:
        self._tables = np.full((0, 1), -1, dtype=np.int64)  # [rows, blocks]: pages, -1 = none
        self._hist = np.zeros((0, 1), dtype=np.int64)  # [rows, positions]: tokens so far
        self._tok = torch.zeros(0, dtype=torch.long, device=self.device)  # fed next
        self._score = torch.zeros(0, dtype=torch.float32, device=self.device)  # cumulative

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
            self.pool = BlockManager(pages, self._page_bytes, self.device)
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

    def _release(self, pages: np.ndarray) -> None:
        """Give back the pages named in `pages` (entries < 0 are none)."""
        pages = pages[pages >= 0]
        if pages.size:
            assert self.pool is not None
            self._pages -= self.pool.release(pages)

    def _forget(self, b: _Beam) -> None:
        """What `b` holds besides its rows' pages: its cross-attention slot, its reservation."""
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
        self._empty_rows()

    # ----- rows ----------------------------------------------------------------------------
    def _row_counts(self) -> np.ndarray:
        return np.fromiter((b.rows for b in self._beams), dtype=np.int64, count=len(self._beams))

    def _keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows where `keep` is true (host and device state alike)."""
        if keep.all():
            return
        self._tables = self._tables[keep]
        self._hist = self._hist[keep]
        idx = self._to_device(np.nonzero(keep)[0])
        self._tok = self._tok[idx]
        self._score = self._score[idx]

    def _drop(self, gone: set[int]) -> None:
        """Drop the beams at indices `gone` of `_beams`: their rows, pages, slots."""
        if not gone:
            return
        counts = self._row_counts()
        dead = np.repeat(np.array([i in gone for i in range(len(self._beams))]), counts)
        self._release(self._tables[dead].reshape(-1))
        for i in gone:
            self._forget(self._beams[i])
        self._keep_rows(~dead)
        self._beams = [b for i, b in enumerate(self._beams) if i not in gone]

    def _to_device(self, a: np.ndarray) -> Tensor:
        """A host index array on the device (asynchronously where the device allows it)."""
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    # ----- membership ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._beams)

    @property
    def num_rows(self) -> int:
        return sum(b.rows for b in self._beams)

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
                positions -= (bp - tail) * b.rows
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
        if r.sampling is not None:
            if r.beam_size != 1:
                raise ValueError("a sampled sentence is one row: beam_size must be 1")
            r.sampling.check()

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
        with matmul_precision(self.stack.dtype):
            cross = self.stack.cross_attention(
                torch.stack([r.embedding.reshape(-1) for r in requests])
            )
        slots = self._slots(len(requests))
        self._cross[torch.tensor(slots, dtype=torch.long, device=self.device)] = cross
        for r, slot, n in zip(requests, slots, pages, strict=True):
            sampler = RowSampler(r.sampling) if r.sampling is not None else None
            self._beams.append(
                _Beam(r.key, r.beam_size, r.max_seq_len, list(r.prefix), slot, n, sampler=sampler)
            )
            self._reserved += n
        # One new row per request, holding its first prefix token.
        longest = max(r.max_seq_len for r in requests)
        blocks = blocks_for(max(longest - 1, 1), self._block)
        self._tables = _widen(self._tables, blocks, -1)
        self._hist = _widen(self._hist, longest, 0)
        n = len(requests)
        tables = np.full((n, self._tables.shape[1]), -1, dtype=np.int64)
        hist = np.zeros((n, self._hist.shape[1]), dtype=np.int64)
        first = np.array([r.prefix[0] for r in requests], dtype=np.int64)
        hist[:, 0] = first
        self._tables = np.concatenate([self._tables, tables])
        self._hist = np.concatenate([self._hist, hist])
        self._tok = torch.cat([self._tok, self._to_device(first)])
        self._score = torch.cat([self._score, self._score.new_zeros(n)])

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
        gone = {i for i, b in enumerate(self._beams) if b.key in keys}
        if gone:
            self._drop(gone)
            if not self._beams:
                self._idle()

    # ----- one token for every row ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Advance every row one token: the beams that finished (best hypothesis each), and the
        beams that failed (NaN log-probabilities, a forward that raised, no page to be had),
        dropped with their pages while the others go on.

        The search's decisions are made for all beams at once (`_choose`): on a GPU on the
        device, the host reading one small array back; on a CPU, where the device is the host,
        the same rules run on NumPy views of the candidates. The host keeps its block tables
        and token lists with NumPy.
        """
        result = StepResult()
        if not self._beams:
            return result
        failed: dict[int, str] = {}  # index in `_beams` → why
        self._new_blocks(failed)
        if failed:
            result.failed += [(self._beams[i].key, why) for i, why in sorted(failed.items())]
            self._drop(set(failed))
            failed = {}
        if not self._beams:
            self._idle()
            return result
        plan = _Plan.of(self._beams, self._block, self.eos)
        lprobs = self._forward(plan, failed)
        chosen, host = self._choose(lprobs, plan)
        self._apply(plan, chosen, host, failed, result)
        if not self._beams:
            self._idle()
        return result

    def _new_blocks(self, failed: dict[int, str]) -> None:
        """A fresh (zeroed) page for every row about to write the first position of a block."""
        assert self.pool is not None
        bp = self._block
        lengths = np.fromiter((b.length for b in self._beams), np.int64, len(self._beams))
        counts = self._row_counts()
        need = (lengths - 1) % bp == 0
        if not need.any():
            return
        asked = np.where(need, counts, 0)
        fits = np.cumsum(asked) <= self.pool.free_pages
        for i in np.nonzero(need & ~fits)[0]:
            failed[int(i)] = "the decoder's cache has no free page (pages were not reserved)"
        take = np.repeat(need & fits, counts)
        n = int(take.sum())
        if not n:
            return
        pages = np.array(self._alloc(n), dtype=np.int64)
        block = np.repeat((lengths - 1) // bp, counts)[take]
        self._tables[np.nonzero(take)[0], block] = pages
        # No stale bytes (another cache's, or NaN patterns) under masked positions.
        assert self._kv is not None
        self._kv.index_fill_(0, self._to_device(pages), 0)

    def _scratch_for(self, numel: int) -> Tensor:
        """A buffer of at least `numel` cache elements for the forward's gathers and the fork's
        copies, kept across steps."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(
                max(numel, self._scratch.numel() * 5 // 4),
                dtype=self.stack.dtype,
                device=self.device,
            )
        return self._scratch

    def _forward(self, plan: _Plan, failed: dict[int, str]) -> Tensor:
        """Log-probabilities [rows, V] (fp32) of every row; if the batched forward raises, each
        beam's rows run alone and the beams that still raise go to `failed` (their rows'
        log-probabilities are zeros)."""
        bp = self._block
        n = plan.num_rows
        width = blocks_for(plan.longest, bp)
        tables = self._tables[:, :width]
        rows = np.arange(n)
        write = tables[rows, plan.row_pos // bp]
        # Blocks past a row's last are masked out: any page of its own stands in.
        tables = np.where(
            np.arange(width)[None, :] <= (plan.row_pos // bp)[:, None], tables, write[:, None]
        )
        idx = self._to_device(
            np.concatenate(
                [plan.row_pos, write, plan.row_pos % bp, plan.row_slot, tables.reshape(-1)]
            )
        )
        pos_t, page_t, off_t, slot_t = idx[: 4 * n].view(4, n)
        table_t = idx[4 * n :].view(n, width)
        tok_t = self._tok
        cross = self._cross[slot_t]
        kv = self._kv
        assert kv is not None
        scratch = self._scratch_for(2 * n * width * kv[0, 0, 0].numel())
        uniform = bool(plan.lengths.min() == plan.longest)
        try:
            with matmul_precision(self.stack.dtype):
                lprobs = self.stack.forward(
                    tok_t, pos_t, plan.longest, kv, page_t, off_t, table_t, cross, uniform, scratch
                )
        except Exception:
            log.exception("the batched decoder step failed; retrying beam by beam")
            parts: list[Tensor | None] = []
            for i, b in enumerate(self._beams):
                rs = slice(int(plan.row0[i]), int(plan.row0[i]) + b.rows)
                try:
                    with matmul_precision(self.stack.dtype):
                        part = self.stack.forward(
                            tok_t[rs],
                            pos_t[rs],
                            b.length,
                            kv,
                            page_t[rs],
                            off_t[rs],
                            table_t[rs, : blocks_for(b.length, bp)],
                            cross[rs],
                            True,
                            scratch,
                        )
                except Exception as e:
                    failed[i] = f"the SONAR decoder failed: {type(e).__name__}: {e}"
                    part = None
                parts.append(part)
            vocab = next((p.shape[1] for p in parts if p is not None), self.stack.vocab_size)
            lprobs = torch.cat(
                [
                    p
                    if p is not None
                    else torch.zeros((b.rows, vocab), dtype=torch.float32, device=kv.device)
                    for b, p in zip(self._beams, parts, strict=True)
                ]
            )
        self.tokens_stepped += n
        return lprobs

    def _choose(self, lprobs: Tensor, plan: _Plan) -> tuple[_Chosen, _HostChoice]:
        """fairseq2's decisions for every beam at once.

        As fairseq2 does, each row's cumulative score is added to its log-probabilities and
        each beam takes the best 2 × K candidates (K the largest beam size) of its rows
        flattened: the beams with c rows each take them in one top-k over a [beams, c × V] view
        (the batch keeps its beams ordered by row count, so there is one such run per count).
        Among a beam's first `beam` candidates the EOS ones become hypotheses (until it has
        `beam`; score normalised by length); its first `beam` non-EOS candidates continue. Rows
        in their prefix take the forced token; rows at the last position may only end (EOS).
        Which rows are in their prefix or at the last position is known on the host, so those
        cases cost nothing in a step that has none."""
        eos = self.eos
        vocab = lprobs.shape[1]
        k2 = 2 * plan.widest
        nb = len(plan.lengths)
        lay = plan.choose_layout()
        in_prefix = plan.forced >= 0
        # One copy to the device: what it needs (and, if it decides, the beams' state).
        on_device = lay.indices
        if not self._decide_on_host:
            per_beam = [plan.beam_size, plan.hyps, plan.lengths, in_prefix, plan.last]
            on_device = np.concatenate([*per_beam, lay.indices])
        idx = self._to_device(on_device)
        at = 0 if self._decide_on_host else 5 * nb
        last_t = idx[at : at + lay.last]
        forced_beam, forced_row, forced_tok = idx[at + lay.last :].view(3, -1)

        if self.pad is not None:
            lprobs.select(1, self.pad).fill_(-torch.inf)
        sampled = self._sample(lprobs, plan)  # before the scores are added in place
        cand = lprobs.add_(self._score.unsqueeze(1))  # fairseq2's sums, in fp32
        if lay.last:
            # At the last position only EOS may follow; a NaN anywhere in the row stays seen.
            ends = cand[last_t, eos]
            ends = torch.where(cand[last_t].isnan().any(1), torch.nan, ends)
            cand.index_fill_(0, last_t, -torch.inf)
            cand[last_t, eos] = ends
        forced_val = cand[forced_row, forced_tok] if lay.forced else None
        # A run of beams with c rows each is a [beams, c × V] view of the rows: no copy.
        best = [
            row_topk(cand[r0 : r0 + beams * c].view(beams, c * vocab), k2)
            for r0, beams, c in lay.runs
        ]
        beam_v = torch.cat([v for v, _ in best]) if len(best) > 1 else best[0][0]
        beam_j = torch.cat([j for _, j in best]) if len(best) > 1 else best[0][1]
        nan = beam_v[:, 0].isnan()
        beam_row = beam_j // vocab
        beam_tok = beam_j - beam_row * vocab
        if sampled is not None:
            # A sampled row's one candidate is its draw (a beam of one: `_decide` ends it on
            # EOS and otherwise continues it).
            beams_t, rows_t, tok = sampled
            beam_tok[beams_t, 0] = tok
            beam_v[beams_t, 0] = cand[rows_t, tok]
            beam_row[beams_t, 0] = 0
        if forced_val is not None:
            # Prefix rows: the forced token is the one candidate.
            beam_tok[forced_beam, 0] = forced_tok
            beam_v[forced_beam, 0] = forced_val
            beam_row[forced_beam, 0] = 0
        chosen = _Chosen(beam_tok.view(-1), beam_v.view(-1))
        if self._decide_on_host:
            # The device is the host: the same rules on NumPy views (a few µs an operation,
            # where a tensor operation on a CPU costs tens).
            tok_h, v_h = beam_tok.numpy(), beam_v.numpy()
            flags, done, norm = _decide(
                tok_h,
                v_h,
                plan.beam_size,
                plan.hyps,
                plan.lengths.astype(np.float32),
                in_prefix,
                plan.last,
                np.arange(k2),
                eos,
            )
            host = _HostChoice(
                tokens=tok_h,
                rows=beam_row.numpy(),
                flags=flags,
                norm=norm,
                done=done,
                nan=nan.numpy(),
                width=k2,
            )
            return chosen, host
        size_t, hyps_t, length_t, prefix_t, last_beam_t = idx[: 5 * nb].view(5, nb)
        flags_t, done_t, norm_t = _decide(
            beam_tok,
            beam_v,
            size_t,
            hyps_t,
            length_t.float(),
            prefix_t.bool(),
            last_beam_t.bool(),
            torch.arange(k2, device=lprobs.device),
            eos,
        )
        packed = torch.cat(
            [
                beam_tok.int().view(-1),
                beam_row.int().view(-1),
                flags_t.int().view(-1),
                norm_t.view(torch.int32).view(-1),
                done_t.int(),
                nan.int(),
            ]
        )
        # The step's one synchronisation: what the host must know to keep its books.
        return chosen, _HostChoice.unpack(packed.cpu().numpy(), plan)

    def _sample(self, lprobs: Tensor, plan: _Plan) -> tuple[Tensor, Tensor, Tensor] | None:
        """The sampled beams that draw this step (not in their prefix, not at their last
        position, where the token is forced): their indices, rows and drawn tokens."""
        if not plan.sampled.size:
            return None
        beams = plan.sampled
        rows = plan.row0[beams]
        samplers = [self._beams[i].sampler for i in beams.tolist()]
        params = draw_params([s for s in samplers if s is not None], lprobs.shape[1])
        idx = self._to_device(np.concatenate([beams, rows]))
        beams_t, rows_t = idx.view(2, -1)
        params_t = torch.from_numpy(params).to(self.device)
        return beams_t, rows_t, sample_tokens(lprobs[rows_t], params_t)

    def _apply(
        self,
        plan: _Plan,
        chosen: _Chosen,
        host: _HostChoice,
        failed: dict[int, str],
        result: StepResult,
    ) -> None:
        """Record hypotheses, finish and fail beams, and lay out the continuing rows (their
        tokens, block tables and device state) from the step's decisions."""
        beams = self._beams
        for i in np.nonzero(host.nan)[0].tolist():
            failed.setdefault(i, "the SONAR decoder produced NaN log-probabilities")
        alive = np.ones(len(beams), dtype=bool)
        alive[list(failed)] = False
        eos = self.eos
        new_hyps = np.nonzero((host.flags == 1) & alive[:, None])
        for i, c in zip(new_hyps[0].tolist(), new_hyps[1].tolist(), strict=True):
            b = beams[i]
            row = int(plan.row0[i] + host.rows[i, c])
            tokens = self._hist[row, len(b.prefix) : b.length].tolist()
            b.hyps.append(DecodedSeq([*tokens, eos], float(host.norm[i, c])))
        for i in sorted(failed):
            result.failed.append((beams[i].key, failed[i]))
        for i in np.nonzero(host.done & alive)[0].tolist():
            b = beams[i]
            # Best first; ties keep the order they were found in (a stable sort).
            b.hyps.sort(key=lambda h: h.score, reverse=True)
            if b.hyps:
                result.finished.append((b.key, b.hyps[0]))
            else:
                result.failed.append((b.key, "the beam search ended without a hypothesis"))
        going = alive & ~host.done
        beam_of, cand = np.nonzero((host.flags == 2) & going[:, None])
        # The beams go on ordered by their rows, most first (a stable sort; the beams that end
        # go last), so that the next step's `_choose` takes each count's beams in one view.
        order = np.argsort(-np.bincount(beam_of, minlength=len(beams)), kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        by = np.argsort(rank[beam_of], kind="stable")
        beam_of, cand = beam_of[by], cand[by]
        parents = plan.row0[beam_of] + host.rows[beam_of, cand]
        tokens = host.tokens[beam_of, cand]
        keep_beams = self._fork(plan, beam_of, parents, going, result)
        ok = keep_beams[beam_of]
        beam_of, cand, parents, tokens = beam_of[ok], cand[ok], parents[ok], tokens[ok]
        # Host books: token lists and block tables follow their parents.
        hist = self._hist[parents]
        hist[np.arange(len(parents)), plan.lengths[beam_of]] = tokens
        self._hist = hist
        sel = self._to_device(beam_of * host.width + cand)
        self._tok = chosen.tokens[sel]
        self._score = chosen.scores[sel]
        counts = np.bincount(beam_of, minlength=len(beams))
        kept: list[_Beam] = []
        for i in order.tolist():
            b = beams[i]
            if keep_beams[i]:
                b.length += 1
                b.rows = int(counts[i])
                kept.append(b)
            else:
                self._forget(b)
        self._beams = kept

    def _fork(
        self,
        plan: _Plan,
        beam_of: np.ndarray,
        parents: np.ndarray,
        going: np.ndarray,
        result: StepResult,
    ) -> np.ndarray:
        """Give each continuing row its block table (sets `_tables`); which beams go on.

        A parent's first child goes on in its pages; the others share its full blocks and copy
        its partly filled last one; rows without children give their pages back (first, so a
        beam stays within `pages_for`)."""
        assert self.pool is not None
        bp = self._block
        old = self._tables
        held = plan.lengths[beam_of]  # positions each parent holds now: 0..length-1
        full, partial = held // bp, held % bp
        _, first_at = np.unique(parents, return_index=True)
        first = np.zeros(len(parents), dtype=bool)
        first[first_at] = True
        dead = np.ones(old.shape[0], dtype=bool)
        dead[parents] = False
        self._release(old[dead].reshape(-1))
        copies = ~first & (partial > 0)
        need = np.bincount(beam_of[copies], minlength=len(going))
        fits = np.cumsum(need) <= self.pool.free_pages
        keep = going & fits
        if not fits[going].all():
            for i in np.nonzero(going & ~fits)[0]:
                result.failed.append(
                    (
                        self._beams[i].key,
                        "the decoder's cache has no free page (pages were not reserved)",
                    )
                )
            lost = ~keep[beam_of]
            self._release(old[np.unique(parents[lost])].reshape(-1))
            beam_of, parents = beam_of[~lost], parents[~lost]
            full, partial, first, copies = full[~lost], partial[~lost], first[~lost], copies[~lost]
        tables = old[parents]
        others = ~first
        shared = tables[others] if others.any() else tables[:0]
        cols = np.arange(tables.shape[1])[None, :]
        self.pool.share(shared[cols < full[others][:, None]])
        # Past the shared blocks a child's table is its own: the copy of the partial block.
        tables[others] = np.where(cols < full[others][:, None], shared, -1)
        n = int(copies.sum())
        if n:
            pages = np.array(self._alloc(n), dtype=np.int64)
            rows = np.nonzero(copies)[0]
            src = old[parents[rows], full[rows]]
            tables[rows, full[rows]] = pages
            kv = self._kv
            assert kv is not None
            dst_t, src_t = self._to_device(np.concatenate([pages, src])).view(2, n)
            # Through the forward's scratch buffer, as many pages at a time as it holds: a fresh
            # temporary would be new memory every step (page faults on a CPU), and growing the
            # scratch would keep that much (n pages of 3 MB at the released size) for good.
            page = kv[0].numel()
            per = max(1, self._scratch_for(page).numel() // page)
            for start in range(0, n, per):
                part = slice(start, min(start + per, n))
                held = self._scratch[: (part.stop - start) * page].view(-1, *kv.shape[1:])
                torch.index_select(kv, 0, src_t[part], out=held)
                kv.index_copy_(0, dst_t[part], held)
        self._tables = tables
        return keep


def _widen(a: np.ndarray, width: int, fill: int) -> np.ndarray:
    """`a` with at least `width` columns (new ones `fill`)."""
    if a.shape[1] >= width:
        return a
    out = np.full((a.shape[0], width), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


@dataclass
class _Plan:
    """One step's layout, from the host's books: the beams' rows, positions, and what the
    device needs to make their decisions."""

    lengths: np.ndarray  # [beams]: tokens each row has (its next position is `length - 1`)
    counts: np.ndarray  # [beams]: rows
    row0: np.ndarray  # [beams]: first row
    row_pos: np.ndarray  # [rows]: the position each row writes
    row_slot: np.ndarray  # [rows]: its beam's cross-attention slot
    beam_size: np.ndarray
    hyps: np.ndarray  # [beams]: hypotheses found so far
    forced: np.ndarray  # [beams]: the forced prefix token, -1 once searching
    last: np.ndarray  # [beams]: at the last position (only EOS may follow)
    widest: int  # the largest beam size
    longest: int  # max(lengths)
    sampled: np.ndarray  # beams that sample this step's token (one row each)

    @staticmethod
    def of(beams: list[_Beam], block: int, eos: int) -> _Plan:
        nb = len(beams)
        lengths = np.fromiter((b.length for b in beams), np.int64, nb)
        counts = np.fromiter((b.rows for b in beams), np.int64, nb)
        beam_size = np.fromiter((b.beam_size for b in beams), np.int64, nb)
        forced = np.fromiter(
            (b.prefix[b.length] if b.length < len(b.prefix) else -1 for b in beams), np.int64, nb
        )
        max_len = np.fromiter((b.max_seq_len for b in beams), np.int64, nb)
        row0 = np.cumsum(counts) - counts
        last = (lengths == max_len - 1) & (forced < 0)
        sampling = np.fromiter((b.sampler is not None for b in beams), bool, nb)
        return _Plan(
            lengths=lengths,
            counts=counts,
            row0=row0,
            row_pos=np.repeat(lengths - 1, counts),
            row_slot=np.repeat(np.fromiter((b.slot for b in beams), np.int64, nb), counts),
            beam_size=beam_size,
            hyps=np.fromiter((len(b.hyps) for b in beams), np.int64, nb),
            forced=forced,
            last=last,
            widest=int(beam_size.max()),
            longest=int(lengths.max()),
            sampled=np.nonzero(sampling & (forced < 0) & ~last)[0],
        )

    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())

    def choose_layout(self) -> _Layout:
        """Everything `_choose` reads from the host, in one array, and its parts' sizes."""
        last = np.nonzero(np.repeat(self.last, self.counts))[0]
        forced_beam = np.nonzero(self.forced >= 0)[0]
        parts = [
            last,
            forced_beam,
            self.row0[forced_beam],
            self.forced[forced_beam],
        ]
        # Runs of consecutive beams with the same number of rows: (first row, beams, rows each).
        starts = np.flatnonzero(np.diff(self.counts, prepend=-1))
        sizes = np.diff(starts, append=len(self.counts))
        runs = list(
            zip(
                self.row0[starts].tolist(),
                sizes.tolist(),
                self.counts[starts].tolist(),
                strict=True,
            )
        )
        return _Layout(np.concatenate(parts), runs=runs, last=last.size, forced=forced_beam.size)


@dataclass
class _Layout:
    """`_Plan.choose_layout`: the host's indices for `_choose` and how many of each kind."""

    indices: np.ndarray
    runs: list[tuple[int, int, int]]  # (first row, beams, rows each) of each run of beams
    last: int  # rows at their last position
    forced: int  # beams in their prefix


@dataclass
class _Chosen:
    """The candidates' tokens and cumulative scores ([beams × 2K], on the device) from which
    the continuing rows are gathered."""

    tokens: Tensor
    scores: Tensor


@dataclass
class _HostChoice:
    """The step's decisions on the host: per beam and candidate (in top-k order) its token, its
    row in the beam, a flag (1 a new hypothesis, 2 a continuing row) and its length-normalised
    score; per beam whether it is done and whether its log-probabilities had a NaN."""

    tokens: np.ndarray
    rows: np.ndarray
    flags: np.ndarray
    norm: np.ndarray
    done: np.ndarray
    nan: np.ndarray
    width: int

    @staticmethod
    def unpack(a: np.ndarray, plan: _Plan) -> _HostChoice:
        nb = len(plan.lengths)
        w = 2 * plan.widest
        m = nb * w
        return _HostChoice(
            tokens=a[:m].reshape(nb, w).astype(np.int64),
            rows=a[m : 2 * m].reshape(nb, w).astype(np.int64),
            flags=a[2 * m : 3 * m].reshape(nb, w),
            norm=a[3 * m : 4 * m].view(np.float32).reshape(nb, w),
            done=a[4 * m : 4 * m + nb].astype(bool),
            nan=a[4 * m + nb :].astype(bool),
            width=w,
        )


def _decide(
    tok: Any,
    score: Any,
    beam_size: Any,
    hyps: Any,
    length: Any,
    in_prefix: Any,
    last: Any,
    col: Any,
    eos: int,
) -> tuple[Any, Any, Any]:
    """fairseq2's rules on each beam's candidates, sorted best first: `tok`/`score` [beams, 2K],
    per beam its size, hypotheses so far, length (float32), whether it is in its prefix or at
    its last position; `col` = arange(2K). NumPy arrays or tensors alike (only operators).

    Among the first `beam` candidates the EOS ones become hypotheses until the beam has
    `beam`; the beam is done when it has them all or is at its last position; the first `beam`
    non-EOS candidates of a beam that is not done continue; a beam in its prefix continues with
    its first candidate (the forced token). Returns per candidate a flag (1 a new hypothesis,
    2 a continuing row), per beam whether it is done, and the length-normalised scores."""
    size = beam_size[:, None]
    searching = ~in_prefix[:, None]
    is_eos = (tok == eos) & (col < size) & searching
    hyp = is_eos & (hyps[:, None] + is_eos.cumsum(1) <= size)
    done = (hyps + is_eos.sum(1) >= beam_size) | last
    other = (tok != eos) & (col < 2 * size) & searching
    cont = other & (other.cumsum(1) <= size) & ~done[:, None]
    cont |= in_prefix[:, None] & (col == 0)
    return 1 * hyp + 2 * cont, done, score / length[:, None]


TOPK_CHUNK = 256  # positions per chunk in `row_topk`
# Where each step's decisions are made: None = on the host exactly when the decoder is on the
# CPU; False runs the device path anywhere (the tests compare the two).
DECIDE_ON_HOST: bool | None = None


def row_topk(x: Tensor, k: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1)` (values sorted, NaN first) for wide rows, at about the cost of one
    `amax` pass: each row's k best lie in its k chunks with the largest maxima (an element
    outside them is beaten by those chunks' maxima), so only those chunks are searched.
    Equal values may come back in another order than a plain top-k's (which does not promise
    one either)."""
    chunk = chunk or TOPK_CHUNK
    n, width = x.shape
    chunks = width // chunk
    if chunks < 4 * k:
        return x.topk(k, dim=1)
    body = x[:, : chunks * chunk].view(n, chunks, chunk).amax(dim=2)
    if width > chunks * chunk:  # the tail is one more (shorter) chunk
        body = torch.cat([body, x[:, chunks * chunk :].amax(dim=1, keepdim=True)], dim=1)
    best = body.topk(k, dim=1).indices  # [n, k] chunks
    cols = (best.unsqueeze(2) * chunk + torch.arange(chunk, device=x.device)).view(n, -1)
    inside = cols < width
    values = x.gather(1, cols.clamp(max=width - 1))
    values = values.masked_fill(~inside, -torch.inf)  # the tail chunk's missing positions
    v, j = values.topk(k, dim=1)
    return v, cols.gather(1, j)


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
