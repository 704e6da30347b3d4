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
  once per row when the row is added.
- Self-attention keys and values live in one cache tensor for all layers and rows, each row with
  its own length (rows at different positions attend through a length mask). A row continues in
  its parent's slot; only forked rows (a parent's second and later children) and rows filling
  the holes that finished sentences leave are copied.
- A prefix of more than two tokens is fed one token per step, where fairseq2 prefills it in one
  chunk (the same arithmetic up to rounding); SONAR's prefix is `</s> __lang__`, one prefill step.
- The scores of hypotheses agree with fairseq2's to float rounding, not bit for bit: batched
  matrix products round differently with the batch's shape (fairseq2's own do too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

CAPACITY_INCREMENT = 16  # positions added to the cache at a time (as fairseq2 does)


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
    # One token list per live row of this beam (1 row until the prefix is done), and the cache
    # slot each row lives in.
    seqs: list[list[int]]
    slots: list[int]
    hyps: list[DecodedSeq] = field(default_factory=list)

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
        cache: Tensor,
        cross: Tensor,
        uniform: bool,
    ) -> Tensor:
        """Log-probabilities [N, V] (fp32) for the next token of each row.

        `tokens`/`positions` [N], `length` = max(positions) + 1 (known on the host: no device
        sync); `cache` [layers, 2, N, H, capacity, head_dim] gets this step's keys and values at
        `positions`; `uniform` says every row is at the same position.
        """
        fe = self.frontend
        x = fe.embed(tokens.unsqueeze(1))
        if fe.scale != 1.0:
            x = x * fe.scale
        # Position p reads row p + 1 of the table (row 0 is for padding).
        freqs = fe.pos_encoder.freqs[positions + 1]
        x = (x.float() + freqs.unsqueeze(1)).type_as(x)
        n = tokens.shape[0]
        rows = torch.arange(n, device=tokens.device)
        if uniform:
            mask = None
        else:
            # Row r sees its own positions 0..positions[r].
            mask = (torch.arange(length, device=tokens.device)[None, :] <= positions[:, None]).view(
                n, 1, 1, length
            )
        heads, head_dim = self.num_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            h = layer.self_norm(x)
            q = layer.q(h).view(n, 1, heads, head_dim).transpose(1, 2)
            k = layer.k(h).view(n, heads, head_dim)
            v = layer.v(h).view(n, heads, head_dim)
            kc, vc = cache[i, 0], cache[i, 1]
            if uniform:
                kc[:, :, length - 1] = k
                vc[:, :, length - 1] = v
            else:
                kc[rows, :, positions] = k
                vc[rows, :, positions] = v
            attn = F.scaled_dot_product_attention(
                q, kc[:, :, :length], vc[:, :, :length], attn_mask=mask
            )
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

    Rows live in slots `0..num_rows-1` of one cache tensor `[layers, 2, slots, H, T, head_dim]`.
    A beam step moves only what beam search changes: a row continues in its parent's slot, and
    only a parent's second and later children (and rows filling the holes finished beams leave)
    are copied. Not thread-safe: one owner (the engine thread, or one `decode` call) drives it.
    """

    def __init__(self, stack: SonarDecoderStack, eos_idx: int, pad_idx: int | None) -> None:
        self.stack = stack
        self.eos = eos_idx
        self.pad = pad_idx
        self.device = stack.device
        self._beams: list[_Beam] = []
        self._rows = 0  # slots in use: 0..rows-1
        self._alloc(0, 0)
        self.tokens_stepped = 0  # row-steps run, for throughput accounting

    # ----- membership ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._beams)

    @property
    def num_rows(self) -> int:
        return self._rows

    def members(self) -> list[Hashable]:
        return [b.key for b in self._beams]

    def cache_bytes(self) -> int:
        return self._cache.numel() * self._cache.element_size()

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
        """Start decoding each request's embedding after its forced prefix, from the next step."""
        if not requests:
            return
        for r in requests:
            self.check(r)
        with _matmul_precision(self.stack.dtype):
            cross = self.stack.cross_attention(
                torch.stack([r.embedding.reshape(-1) for r in requests])
            )
        first = self._rows
        self._ensure_slots(first + len(requests))
        for j, r in enumerate(requests):
            self._beams.append(
                _Beam(
                    r.key, r.beam_size, r.max_seq_len, list(r.prefix), [[r.prefix[0]]], [first + j]
                )
            )
        new = slice(first, first + len(requests))
        self._cross[new] = cross
        self._scores[new] = 0.0
        self._cache[:, :, new] = 0.0  # no stale values, even masked, under a new row
        self._rows += len(requests)

    @torch.inference_mode()
    def remove(self, keys: set[Hashable]) -> None:
        """Drop the beams of `keys` (cancelled) with their rows."""
        if any(b.key in keys for b in self._beams):
            self._beams = [b for b in self._beams if b.key not in keys]
            self._compact([(b, b.seqs, b.slots) for b in self._beams], {})

    # ----- one token for every row ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Advance every row one token: the beams that finished (best hypothesis each), and the
        beams whose log-probabilities came out NaN (dropped; the others go on)."""
        result = StepResult()
        if not self._beams:
            return result
        n = self._rows
        tokens = [0] * n
        positions = [0] * n
        for b in self._beams:
            for seq, slot in zip(b.seqs, b.slots, strict=True):
                tokens[slot] = seq[-1]
                positions[slot] = len(seq) - 1
        need = max(positions) + 1
        if need > self._cache.shape[4]:
            self._grow_positions(need)
        dev = self.device
        tok_t = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        uniform = min(positions) == need - 1
        with _matmul_precision(self.stack.dtype):
            lprobs = self.stack.forward(
                tok_t, pos_t, need, self._cache[:, :, :n], self._cross[:n], uniform
            )
        self.tokens_stepped += n
        nan_rows = lprobs.isnan().any(dim=-1)
        if bool(nan_rows.any()):
            bad = set(torch.nonzero(nan_rows).flatten().tolist())
            for b in self._beams:
                if bad.intersection(b.slots):
                    result.failed.append(
                        (b.key, "the SONAR decoder produced NaN log-probabilities")
                    )
            self._beams = [b for b in self._beams if not bad.intersection(b.slots)]
            lprobs[nan_rows] = 0.0  # those rows are dropped below; keep the arithmetic clean

        # Rows still in their prefix take the forced token; the others search.
        forced: list[_Beam] = []
        eos_only: list[int] = []
        groups: dict[tuple[int, int], list[_Beam]] = {}
        for b in self._beams:
            if b.length < len(b.prefix):
                forced.append(b)
            else:
                groups.setdefault((len(b.slots), b.beam_size), []).append(b)
                if b.length == b.max_seq_len - 1:
                    eos_only.extend(b.slots)
        if self.pad is not None:
            lprobs[:, self.pad] = -torch.inf
        if eos_only:
            rows_t = torch.tensor(eos_only, dtype=torch.long, device=dev)
            keep_eos = lprobs[rows_t, self.eos].clone()
            lprobs[rows_t] = -torch.inf
            lprobs[rows_t, self.eos] = keep_eos

        scores = self._scores[:n]
        forced_scores: list[float] = []
        if forced:
            fr = torch.tensor([b.slots[0] for b in forced], dtype=torch.long, device=dev)
            ft = torch.tensor([b.prefix[b.length] for b in forced], dtype=torch.long, device=dev)
            forced_scores = (scores[fr] + lprobs[fr, ft]).tolist()
        # Candidates of all searching beams of the same shape in one topk (one host sync).
        vocab = lprobs.shape[1]
        picks: dict[int, tuple[list[float], list[int]]] = {}
        for (_, beam_size), members in groups.items():
            idx = torch.tensor([b.slots for b in members], dtype=torch.long, device=dev)
            cand = lprobs[idx] + scores[idx].unsqueeze(-1)  # [G, rows, V]
            top = torch.topk(cand.view(len(members), -1), k=min(2 * beam_size, vocab))
            for b, val, ind in zip(members, top.values.tolist(), top.indices.tolist(), strict=True):
                picks[id(b)] = (val, ind)

        # Each continuing beam with its new rows' tokens and their parents' slots; the new
        # rows' cumulative scores, keyed by the identity of their token lists.
        plan: list[tuple[_Beam, list[list[int]], list[int]]] = []
        new_scores: dict[int, float] = {}
        for b, score in zip(forced, forced_scores, strict=True):
            plan.append((b, [b.seqs[0] + [b.prefix[b.length]]], b.slots))
            new_scores[id(plan[-1][1][0])] = score
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
                continue
            seqs: list[list[int]] = []
            parents: list[int] = []
            for score, flat in zip(values, indices, strict=True):
                tok = flat % vocab
                if tok == self.eos:
                    continue
                row = flat // vocab
                seqs.append(b.seqs[row] + [tok])
                parents.append(b.slots[row])
                new_scores[id(seqs[-1])] = score
                if len(seqs) == b.beam_size:
                    break
            plan.append((b, seqs, parents))
        self._beams = [b for b, _, _ in plan]
        self._compact(plan, new_scores)
        return result

    # ----- slots ---------------------------------------------------------------------------
    def _compact(
        self,
        plan: list[tuple[_Beam, list[list[int]], list[int]]],
        new_scores: dict[int, float],
    ) -> None:
        """Give every planned row a slot in 0..m-1: its parent's slot when it is the first to
        claim it and it lies below m, else a free one (copying the parent's cache there)."""
        m = sum(len(seqs) for _, seqs, _ in plan)
        self._ensure_slots(m)
        claimed = [False] * max(self._rows, m)
        final: list[list[int]] = []
        pending: list[tuple[int, int, int]] = []  # (beam index, row index, parent slot)
        for bi, (_, seqs, parents) in enumerate(plan):
            slots = [-1] * len(seqs)
            for ri, parent in enumerate(parents):
                if parent < m and not claimed[parent]:
                    claimed[parent] = True
                    slots[ri] = parent
                else:
                    pending.append((bi, ri, parent))
            final.append(slots)
        free = iter(i for i in range(m) if not claimed[i])
        src: list[int] = []
        dst: list[int] = []
        for bi, ri, parent in pending:
            slot = next(free)
            final[bi][ri] = slot
            src.append(parent)
            dst.append(slot)
        if src:
            dev = self.device
            s_t = torch.tensor(src, dtype=torch.long, device=dev)
            d_t = torch.tensor(dst, dtype=torch.long, device=dev)
            self._cache.index_copy_(2, d_t, self._cache.index_select(2, s_t))
            self._cross.index_copy_(0, d_t, self._cross.index_select(0, s_t))
        score_slots: list[int] = []
        score_values: list[float] = []
        for (b, seqs, _), slots in zip(plan, final, strict=True):
            b.seqs, b.slots = seqs, slots
            for seq, slot in zip(seqs, slots, strict=True):
                if id(seq) in new_scores:
                    score_slots.append(slot)
                    score_values.append(new_scores[id(seq)])
        if score_slots:
            idx = torch.tensor(score_slots, dtype=torch.long, device=self.device)
            self._scores[idx] = torch.tensor(score_values, dtype=torch.float32, device=self.device)
        elif src and not new_scores:  # `remove`: scores move with their rows
            self._scores.index_copy_(
                0,
                torch.tensor(dst, dtype=torch.long, device=self.device),
                self._scores.index_select(
                    0, torch.tensor(src, dtype=torch.long, device=self.device)
                ),
            )
        self._rows = m
        if m == 0:
            self._alloc(0, 0)  # an idle batch holds no memory

    def _alloc(self, slots: int, positions: int) -> None:
        st = self.stack
        self._cache = torch.zeros(
            (st.num_layers, 2, slots, st.num_heads, positions, st.head_dim),
            device=self.device,
            dtype=st.dtype,
        )
        self._cross = torch.zeros(
            (slots, st.num_layers, st.model_dim), device=self.device, dtype=st.dtype
        )
        self._scores = torch.zeros(slots, device=self.device, dtype=torch.float32)

    def _ensure_slots(self, needed: int) -> None:
        have = self._cache.shape[2]
        if needed <= have:
            return
        slots = max(needed, 2 * have, 16)
        old = (self._cache, self._cross, self._scores)
        self._alloc(slots, max(self._cache.shape[4], CAPACITY_INCREMENT))
        self._cache[:, :, :have, :, : old[0].shape[4]] = old[0]
        self._cross[:have] = old[1]
        self._scores[:have] = old[2]

    def _grow_positions(self, need: int) -> None:
        cap = -(-need // CAPACITY_INCREMENT) * CAPACITY_INCREMENT
        s = self._cache.shape
        grown = self._cache.new_zeros(*s[:4], cap, s[5])
        grown[:, :, :, :, : s[4]] = self._cache
        self._cache = grown


def decode_all(batch: DecodeBatch, requests: list[BeamRequest]) -> list[DecodedSeq]:
    """Decode `requests` to completion; results in request order."""
    batch.add(requests)
    out: dict[Hashable, DecodedSeq] = {}
    while len(batch):
        result = batch.step()
        if result.failed:
            raise FloatingPointError(result.failed[0][1])
        out.update(result.finished)
    return [out[r.key] for r in requests]
