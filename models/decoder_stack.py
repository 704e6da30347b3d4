"""The SONAR text decoder's layers run one token per row over a paged self-attention cache.

The weights are a `models.sonar.decoder.SonarTextDecoder` (plain PyTorch; a fairseq2 decoder's
tensors are handed to one), so nothing here needs fairseq2. `models.decode_batch` drives it.

- The cross-attention reads a 1-token memory (the sentence embedding), so its softmax is exactly
  1 and its output, `out_proj(v_proj(embedding))`, is the same at every step: it is computed
  once per beam (`cross_attention`) and every row of the beam reads it.
- Self-attention keys and values live in pages of the `models.block_manager.BlockManager`
  (`DecoderCache`). A block is one page viewed as `[layers, 2, block_positions, H, head_dim]`;
  each row has a block table (its pages, in order) on the host. Each step writes every row's
  keys and values at its (page, offset) and gathers the rows' blocks per layer for attention
  (rows at different positions attend through a length mask). A beam's children share their
  parent's full blocks (reference counts); the parent's partly filled last block goes on with
  its first child and is copied for the others. Nothing grows by copying and nothing is copied
  whole: a row takes one (zeroed) page when it crosses a block boundary, and gives its pages
  back when it leaves.
- A step whose batched forward raises is run again beam by beam (rewriting the same keys and
  values at the same places); the beams that still raise fail alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from models.block_manager import BlockManager, blocks_for
from models.sonar.decoder import FeedForward, SonarTextDecoder, UnsupportedDecoder

log = logging.getLogger("sonar_llm.decoder")

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
        self.blocks = decoder.layers  # the layer modules (the benchmarks count their weights)
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

    def forward_each(
        self,
        spans: list[tuple[int, int, int]],
        tokens: Tensor,
        positions: Tensor,
        kv: Tensor,
        write_pages: Tensor,
        write_offsets: Tensor,
        tables: Tensor,
        cross: Tensor,
        scratch: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, str]]:
        """`forward` run on each span of rows alone (first row, rows, length: the rows of one
        beam, all at one position), after a batched call raised: it rewrites the same keys and
        values at the same places. Returns the log-probabilities of every row (zeros for the
        spans that still raise) and why those failed, by span index."""
        block = kv.shape[3]
        parts: list[Tensor | None] = []
        failed: dict[int, str] = {}
        for i, (r0, n, length) in enumerate(spans):
            rs = slice(r0, r0 + n)
            try:
                with matmul_precision(self.dtype):
                    part = self.forward(
                        tokens[rs],
                        positions[rs],
                        length,
                        kv,
                        write_pages[rs],
                        write_offsets[rs],
                        tables[rs, : blocks_for(length, block)],
                        cross[rs],
                        True,
                        scratch,
                    )
            except Exception as e:
                failed[i] = f"the SONAR decoder failed: {type(e).__name__}: {e}"
                part = None
            parts.append(part)
        vocab = next((p.shape[1] for p in parts if p is not None), self.vocab_size)
        rows = [
            p if p is not None else torch.zeros((n, vocab), dtype=torch.float32, device=kv.device)
            for p, (_, n, _) in zip(parts, spans, strict=True)
        ]
        return torch.cat(rows), failed


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


def to_device(a: np.ndarray, device: torch.device) -> Tensor:
    """A host index array on the device (asynchronously where the device allows it)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DecoderCache:
    """The self-attention cache of a batch's decoder rows: a block table per row (its pages of
    `pool`, tagged `owner`, in order; on the host) and the pages' keys and values, a block of
    `block_positions` positions per page. Rows are the batch's, in its order; the batch says
    where each row is, and this keeps its pages and runs the stack over them.
    """

    def __init__(self, stack: SonarDecoderStack, pool: BlockManager, owner: str) -> None:
        self.stack = stack
        self.pool = pool
        self.owner = owner
        self.bytes_per_position = stack.bytes_per_position()
        self.block_positions = pool.page_bytes // self.bytes_per_position
        if self.block_positions < 1:
            raise ValueError(
                f"a page of {pool.page_bytes} B cannot hold one decoder position "
                f"({self.bytes_per_position} B)"
            )
        if pool.device.type != stack.device.type:
            raise ValueError(f"the page pool is on {pool.device}, the decoder on {stack.device}")
        shape = (stack.num_layers, 2, self.block_positions, stack.num_heads, stack.head_dim)
        self.kv = pool.view(stack.dtype, shape)  # the pool's pages as blocks
        self.pages = 0  # distinct pages the rows hold
        self.tables = np.full((0, 1), -1, dtype=np.int64)  # [rows, blocks]: pages, -1 = none
        # Where the forward gathers each layer's keys and values (one layer's worth, reused).
        self._scratch = torch.empty(0, dtype=stack.dtype, device=stack.device)

    def clear(self) -> None:
        """No rows left: the pages went back; the scratch buffer goes too."""
        assert self.pages == 0
        self.tables = np.full((0, 1), -1, dtype=np.int64)
        self._scratch = self._scratch.new_empty(0)

    def add_rows(self, n: int, max_seq_len: int) -> None:
        """`n` rows without pages, for sequences of up to `max_seq_len` tokens."""
        wider = blocks_for(max(max_seq_len - 1, 1), self.block_positions) - self.tables.shape[1]
        self.tables = np.pad(self.tables, ((0, n), (0, max(wider, 0))), constant_values=-1)

    def release(self, tables: np.ndarray) -> None:
        """Give back the pages named in `tables` (entries < 0 are none)."""
        self.pages -= self.pool.release(tables[tables >= 0])

    def bytes(self) -> int:
        """Bytes of the pages the rows hold (host-side accounting, no device sync)."""
        return self.pages * self.pool.page_bytes

    def new_blocks(self, lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """A fresh (zeroed) page for every row about to write the first position of a block,
        for beams of `counts` rows at `lengths` tokens; which beams found none."""
        bp = self.block_positions
        need = (lengths - 1) % bp == 0
        if not need.any():
            return need
        fits = np.cumsum(np.where(need, counts, 0)) <= self.pool.free_pages
        take = np.repeat(need & fits, counts)
        n = int(take.sum())
        if n:
            pages = np.array(self.pool.alloc(n, self.owner), dtype=np.int64)
            self.pages += n
            block = np.repeat((lengths - 1) // bp, counts)[take]
            self.tables[np.nonzero(take)[0], block] = pages
            # No stale bytes (another cache's, or NaN patterns) under masked positions.
            self.kv.index_fill_(0, to_device(pages, self.stack.device), 0)
        return need & ~fits

    def fork(
        self, held: np.ndarray, beam_of: np.ndarray, parents: np.ndarray, going: np.ndarray
    ) -> np.ndarray:
        """The tables of the rows that go on: children of rows `parents` (of beams `beam_of`,
        holding `held` positions) of the beams in `going`; which beams got their pages.

        A parent's first child goes on in its pages; the others share its full blocks and copy
        its partly filled last one; rows without children give their pages back (first, so a
        beam stays within its reservation)."""
        bp = self.block_positions
        old = self.tables
        full = held // bp
        _, first_at = np.unique(parents, return_index=True)
        first = np.zeros(len(parents), dtype=bool)
        first[first_at] = True
        dead = np.ones(old.shape[0], dtype=bool)
        dead[parents] = False
        self.release(old[dead])
        copies = ~first & (held % bp > 0)
        need = np.bincount(beam_of[copies], minlength=len(going))
        fits = np.cumsum(need) <= self.pool.free_pages
        keep = going & fits
        if not fits[going].all():
            lost = ~keep[beam_of]
            self.release(old[np.unique(parents[lost])])
            parents, full, first, copies = parents[~lost], full[~lost], first[~lost], copies[~lost]
        self.tables, src, dst = self.pool.fork(old, parents, full, first, copies, self.owner)
        self.pages += dst.size
        if dst.size:
            self._copy_pages(src, dst)
        return keep

    def _copy_pages(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy the cache's pages `src` into pages `dst`."""
        n = dst.size
        kv = self.kv
        dst_t, src_t = to_device(np.concatenate([dst, src]), self.stack.device).view(2, n)
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

    def _scratch_for(self, numel: int) -> Tensor:
        """A buffer of at least `numel` cache elements for the forward's gathers and the fork's
        copies, kept across steps."""
        if self._scratch.numel() < numel:
            self._scratch = torch.empty(
                max(numel, self._scratch.numel() * 5 // 4),
                dtype=self.stack.dtype,
                device=self.stack.device,
            )
        return self._scratch

    def forward(
        self,
        tokens: Tensor,
        row_pos: np.ndarray,
        row_slot: np.ndarray,
        cross: Tensor,
        spans: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> tuple[Tensor, dict[int, str]]:
        """Log-probabilities [rows, V] (fp32) of every row feeding `tokens` at `row_pos`, with
        the cross-attention terms `cross[row_slot]`. If the batched forward raises, each span
        of rows (a beam's: `spans` holds each one's first row, rows and length) runs alone;
        those that still raise are returned by span index, with why (their rows'
        log-probabilities are zeros)."""
        bp = self.block_positions
        n = row_pos.shape[0]
        longest = int(row_pos.max()) + 1
        width = blocks_for(longest, bp)
        tables = self.tables[:, :width]
        write = tables[np.arange(n), row_pos // bp]
        # Blocks past a row's last are masked out: any page of its own stands in.
        tables = np.where(
            np.arange(width)[None, :] <= (row_pos // bp)[:, None], tables, write[:, None]
        )
        idx = to_device(
            np.concatenate([row_pos, write, row_pos % bp, row_slot, tables.reshape(-1)]),
            self.stack.device,
        )
        pos_t, page_t, off_t, slot_t = idx[: 4 * n].view(4, n)
        table_t = idx[4 * n :].view(n, width)
        rows_cross = cross[slot_t]
        kv = self.kv
        scratch = self._scratch_for(2 * n * width * kv[0, 0, 0].numel())
        uniform = bool(row_pos.min() == longest - 1)
        try:
            with matmul_precision(self.stack.dtype):
                return self.stack.forward(
                    tokens, pos_t, longest, kv, page_t, off_t, table_t, rows_cross, uniform, scratch
                ), {}
        except Exception:
            log.exception("the batched decoder step failed; retrying beam by beam")
            args = (tokens, pos_t, kv, page_t, off_t, table_t, rows_cross, scratch)
            row0, rows, lengths = (a.tolist() for a in spans)
            return self.stack.forward_each(list(zip(row0, rows, lengths, strict=True)), *args)

    def used_bytes(self, lengths: np.ndarray, counts: np.ndarray) -> int:
        """Bytes of the positions held by beams of `counts` rows at `lengths` tokens, a
        position shared by sibling rows counted once.

        Every block but a row's last is full, and a partly filled last block is the row's own,
        so the positions are the pages' minus the empty tails of the rows' last blocks.
        """
        bp = self.block_positions
        tail = (lengths - 1) % bp
        empty = np.where(tail > 0, (bp - tail) * counts, 0)
        return int(self.pages * bp - empty.sum()) * self.bytes_per_position
