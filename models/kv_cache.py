"""The SONAR-LLM's keys and values in fixed-size blocks (pages of `models.block_manager`).

Each sequence (a request, keyed by any hashable) owns a block table: the pages holding its
positions `0..length-1`, `block_positions` to a page, every layer's keys and values in the same
page. A sequence grows by whole pages and leaves by giving them back; no other sequence's memory
moves. Lengths and tables live on the host, so bookkeeping and gauges never wait for the device.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from models.block_manager import BlockManager, OutOfPages, pages_for


class PagedKVCache:
    """Per-sequence block tables over a page pool; `write` and `gather` serve one layer."""

    def __init__(
        self,
        pool: BlockManager,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        owner: str = "llm",
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.num_layers = num_layers
        self.dtype = dtype
        self.bytes_per_position = self.position_bytes(num_layers, kv_heads, head_dim, dtype)
        self.block_positions = pool.page_bytes // self.bytes_per_position
        if self.block_positions < 1:
            raise ValueError(
                f"pages of {pool.page_bytes} B cannot hold one position "
                f"({self.bytes_per_position} B)"
            )
        # [pages, layers, K/V, block positions, kv_heads, head_dim]
        self._blocks = pool.view(dtype, (num_layers, 2, self.block_positions, kv_heads, head_dim))
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    @staticmethod
    def position_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * kv_heads * head_dim * elem

    # ----- membership ----------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def add(self, key: Hashable) -> None:
        """Start an empty sequence."""
        if key in self._tables:
            raise KeyError(f"sequence {key!r} is already in the cache")
        self._tables[key] = []
        self._lengths[key] = 0

    def remove(self, key: Hashable) -> None:
        """Drop a sequence and give its pages back (no-op if absent)."""
        pages = self._tables.pop(key, None)
        self._lengths.pop(key, None)
        if pages:
            self.pool.release(pages)

    def length(self, key: Hashable) -> int:
        return self._lengths[key]

    # ----- accounting (host only) ----------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes holding context (the sum of lengths)."""
        return sum(self._lengths.values()) * self.bytes_per_position

    def allocated_bytes(self) -> int:
        """Bytes of the pages the sequences hold."""
        return sum(len(t) for t in self._tables.values()) * self.pool.page_bytes

    # ----- positions -----------------------------------------------------------------------
    def grow(self, keys: Sequence[Hashable], counts: Sequence[int]) -> list[int]:
        """Make room for `counts[i]` more positions of `keys[i]`; returns their start positions.

        Lengths advance at once: the caller writes those positions in every layer. All or
        nothing: OutOfPages leaves every sequence as it was.
        """
        need = sum(
            max(0, pages_for(self._lengths[k] + n, self.block_positions) - len(self._tables[k]))
            for k, n in zip(keys, counts, strict=True)
        )
        if need > self.pool.free_pages:
            raise OutOfPages(f"{need} pages needed, {self.pool.free_pages} free")
        starts = []
        for key, n in zip(keys, counts, strict=True):
            start = self._lengths[key]
            table = self._tables[key]
            need = pages_for(start + n, self.block_positions) - len(table)
            if need > 0:
                fresh = self.pool.alloc(need, self.owner)
                # Attention reads whole blocks (masked past each length), and a masked NaN still
                # poisons the weighted sum: a page's previous bytes (uninitialised memory, or
                # another cache's layout) must not survive.
                self._blocks[torch.tensor(fresh, device=self.pool.device)] = 0
                table.extend(fresh)
            self._lengths[key] = start + n
            starts.append(start)
        return starts

    def shrink(self, keys: Sequence[Hashable], counts: Sequence[int]) -> None:
        """Undo a `grow` whose positions could not be written (a failed call)."""
        for key, n in zip(keys, counts, strict=True):
            if key not in self._tables:
                continue
            length = self._lengths[key] = max(0, self._lengths[key] - n)
            table = self._tables[key]
            extra = len(table) - pages_for(length, self.block_positions)
            if extra > 0:
                self.pool.release(table[-extra:])
                del table[-extra:]

    def slots(
        self, keys: Sequence[Hashable], starts: Sequence[int], counts: Sequence[int], width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Where `write` puts each new position: (page, offset, flat index into [B, width])."""
        bp = self.block_positions
        pages, offsets, flat = [], [], []
        for b, (key, start, n) in enumerate(zip(keys, starts, counts, strict=True)):
            table = self._tables[key]
            for t in range(n):
                p = start + t
                pages.append(table[p // bp])
                offsets.append(p % bp)
                flat.append(b * width + t)
        dev = self.pool.device
        return (
            torch.tensor(pages, dtype=torch.long, device=dev),
            torch.tensor(offsets, dtype=torch.long, device=dev),
            torch.tensor(flat, dtype=torch.long, device=dev),
        )

    def table(self, keys: Sequence[Hashable]) -> tuple[Tensor, int]:
        """The block tables of `keys` as one [B, blocks] tensor (short rows padded with a page
        of their own, masked out by the caller) and the longest length."""
        tables = [self._tables[k] for k in keys]
        width = max(len(t) for t in tables)
        rows = [t + [t[0]] * (width - len(t)) for t in tables]
        longest = max(self._lengths[k] for k in keys)
        return torch.tensor(rows, dtype=torch.long, device=self.pool.device), longest

    def write(self, layer: int, slots: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Store keys/values [B, T, kv_heads, head_dim] at the positions `slots` names."""
        pages, offsets, flat = slots
        kv_heads, head_dim = k.shape[2], k.shape[3]
        self._blocks[pages, layer, 0, offsets] = k.reshape(-1, kv_heads, head_dim)[flat]
        self._blocks[pages, layer, 1, offsets] = v.reshape(-1, kv_heads, head_dim)[flat]

    def gather(self, layer: int, table: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values [B, kv_heads, length, head_dim] of the sequences in `table`."""
        blocks = self._blocks[table, layer]  # [B, blocks, 2, block positions, kv, hd]
        b, n, _, bp, kv, hd = blocks.shape
        k = blocks[:, :, 0].reshape(b, n * bp, kv, hd)[:, :length].transpose(1, 2)
        v = blocks[:, :, 1].reshape(b, n * bp, kv, hd)[:, :length].transpose(1, 2)
        return k, v
