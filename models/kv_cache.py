"""A batch of per-request KV caches: one padded tensor per layer, one row per request.

Rows hold different context lengths; each row writes its next position at its own length, and
attention masks out what lies beyond it. Rows join (`concat`) and leave (`select`) between steps,
so a finished request's memory goes with its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Capacity grows in steps of this many positions, so a step rarely reallocates.
CAPACITY_STEP = 32


def _round_up(n: int) -> int:
    return max(CAPACITY_STEP, -(-n // CAPACITY_STEP) * CAPACITY_STEP)


@dataclass
class KVCache:
    """Keys and values per layer, `[batch, kv_heads, capacity, head_dim]`, plus row lengths."""

    keys: list[Tensor]
    values: list[Tensor]
    lengths: Tensor  # [batch] int64, on the cache's device

    @classmethod
    def empty(
        cls,
        batch: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (batch, kv_heads, _round_up(capacity), head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            lengths=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def bytes_per_position(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[1] * k.shape[3] * k.element_size()

    def used_bytes(self) -> int:
        """Bytes holding real context (sum of row lengths); padding is not counted."""
        return int(self.lengths.sum().item()) * self.bytes_per_position()

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def ensure_capacity(self, needed: int) -> None:
        """Grow every layer's tensors so that `needed` positions fit."""
        if needed > self.capacity:
            self._resize(_round_up(max(needed, self.capacity * 2)))

    def _resize(self, capacity: int) -> None:
        for tensors in (self.keys, self.values):
            for i, t in enumerate(tensors):
                grown = t.new_zeros((t.shape[0], t.shape[1], capacity, t.shape[3]))
                grown[:, :, : t.shape[2]] = t
                tensors[i] = grown

    def select(self, rows: list[int]) -> KVCache:
        """A cache holding only `rows`, in that order (finished requests drop out)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        longest = int(self.lengths[index].max().item()) if rows else 0
        # Shrink to what the remaining rows need, so a long finished request frees its padding.
        cap = min(self.capacity, _round_up(longest + 1))
        return KVCache(
            keys=[k.index_select(0, index)[:, :, :cap].contiguous() for k in self.keys],
            values=[v.index_select(0, index)[:, :, :cap].contiguous() for v in self.values],
            lengths=self.lengths.index_select(0, index),
        )

    def assign(self, rows: list[int], other: KVCache) -> None:
        """Write `other` (e.g. a stepped `select(rows)`) back into `rows`."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        if other.capacity > self.capacity:
            self._resize(other.capacity)
        cap = other.capacity
        for mine, theirs in zip(
            (*self.keys, *self.values), (*other.keys, *other.values), strict=True
        ):
            mine[index, :, :cap] = theirs
        self.lengths[index] = other.lengths

    @staticmethod
    def concat(caches: list[KVCache]) -> KVCache:
        """One cache with the rows of all `caches`, in order."""
        caches = [c for c in caches if c.batch_size]
        if len(caches) == 1:
            return caches[0]
        cap = max(c.capacity for c in caches)
        for c in caches:
            if c.capacity < cap:
                c._resize(cap)
        return KVCache(
            keys=[torch.cat(ks, 0) for ks in zip(*(c.keys for c in caches), strict=True)],
            values=[torch.cat(vs, 0) for vs in zip(*(c.values for c in caches), strict=True)],
            lengths=torch.cat([c.lengths for c in caches]),
        )
