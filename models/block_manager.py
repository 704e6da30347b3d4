"""Who owns memory: one block manager for every cache, a byte buffer cut into equal pages.

The SONAR-LLM's KV cache and the SONAR decoder's self-attention cache both keep their positions
in fixed-size blocks, one block per page (nano-vllm's block manager is the model). The scheduler
owns the block manager: admission reserves pages in it (`reserve`), the caches allocate, fork
(`share`) and free (`release`) the pages of their block tables in it, and the cache gauges read
from it. Each cache views the pages with its own dtype and block shape (`BlockManager.view`), so the
two share one limit at page granularity: a page that one cache gives back is the next one the
other may take. Rows join, leave and grow by pages; nothing is ever copied to grow, and the live
cache is never copied whole.

The buffer is allocated once, uninitialised: on a CPU the operating system commits a page of it
only when it is first written, so resident memory follows what was used, up to the limit; on a
GPU it is reserved up front, as vLLM reserves its KV cache.

Pages are reference-counted so a beam's children can share their parent's full blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

PAGE_ALIGN = 256  # bytes; every dtype's element size divides it
BLOCK_POSITIONS = 16  # positions per block for the cache with the most bytes per position


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for (the scheduler's reservations prevent it)."""


def page_bytes_for(bytes_per_position: Iterable[int], positions: int = BLOCK_POSITIONS) -> int:
    """A page size holding `positions` positions of the widest cache (aligned)."""
    widest = max(bytes_per_position)
    need = widest * positions
    return -(-need // PAGE_ALIGN) * PAGE_ALIGN


class BlockManager:
    """`num_pages` pages of `page_bytes` each: reserved by admission, allocated by count, freed
    by reference count. Every number here is on the host: no call waits for the device.

    Not thread-safe: one owner (the engine thread, or one decode call) drives it.
    """

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device | str) -> None:
        if num_pages < 1:
            raise ValueError(f"a page pool needs at least one page, got {num_pages}")
        if page_bytes < PAGE_ALIGN or page_bytes % PAGE_ALIGN:
            raise ValueError(f"page_bytes must be a positive multiple of {PAGE_ALIGN}")
        self.page_bytes = page_bytes
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.buffer = torch.empty((num_pages, page_bytes), dtype=torch.uint8, device=self.device)
        # Low page numbers first: they are the ones already committed (CPU) and warm.
        self._free = list(range(num_pages - 1, -1, -1))
        # Reference counts and owners as arrays: a beam search shares and releases hundreds of
        # pages a step, in one vectorised call.
        self._refs = np.zeros(num_pages, dtype=np.int64)
        self._held: dict[str, int] = {}  # pages in use, per owner tag (for the gauges)
        self._owner_names: list[str] = []
        self._owner = np.zeros(num_pages, dtype=np.int64)  # index into `_owner_names`
        self.reserved = 0  # pages promised to admitted work (see `reserve`)

    @classmethod
    def with_capacity(
        cls, capacity_bytes: int, page_bytes: int, device: torch.device | str
    ) -> BlockManager:
        """As many whole pages as fit in `capacity_bytes`."""
        return cls(capacity_bytes // page_bytes, page_bytes, device)

    # ----- accounting ----------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def held_pages(self, owner: str) -> int:
        return self._held.get(owner, 0)

    def held_bytes(self, owner: str) -> int:
        return self.held_pages(owner) * self.page_bytes

    # ----- admission (the scheduler's promises) --------------------------------------------
    def can_reserve(self, pages: int) -> bool:
        return self.reserved + pages <= self.num_pages

    def reserve(self, pages: int) -> None:
        """Promise `pages` to admitted work: what it may allocate at worst, so an allocation
        of admitted work never finds the pages gone."""
        if not self.can_reserve(pages):
            free = self.num_pages - self.reserved
            raise OutOfPages(f"{pages} pages asked for, {free} not promised")
        self.reserved += pages

    def unreserve(self, pages: int) -> None:
        if pages > self.reserved:
            raise ValueError(f"{pages} pages given back, only {self.reserved} promised")
        self.reserved -= pages

    # ----- pages ---------------------------------------------------------------------------
    def alloc(self, n: int, owner: str) -> list[int]:
        """`n` fresh pages (reference count 1) for `owner`; OutOfPages if fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"{n} pages asked for, {len(self._free)} free of {self.num_pages}")
        if n <= 0:
            return []
        pages = self._free[-n:][::-1]  # the order single pops would give
        del self._free[-n:]
        if owner not in self._owner_names:
            self._owner_names.append(owner)
        self._refs[pages] = 1
        self._owner[pages] = self._owner_names.index(owner)
        self._held[owner] = self._held.get(owner, 0) + n
        return pages

    def share(self, pages: Iterable[int] | np.ndarray) -> None:
        """One more holder for each of `pages` (a page may appear several times)."""
        idx = _indices(pages)
        if idx.size == 0:
            return
        if (self._refs[idx] < 1).any():
            bad = idx[self._refs[idx] < 1][0]
            raise ValueError(f"page {bad} is not allocated")
        np.add.at(self._refs, idx, 1)

    def release(self, pages: Iterable[int] | np.ndarray) -> int:
        """One holder fewer for each of `pages`; a page nobody holds is free again. Returns how
        many pages became free."""
        idx = _indices(pages)
        if idx.size == 0:
            return 0
        taken = np.bincount(idx)
        touched = np.nonzero(taken)[0]
        if (self._refs[touched] < taken[touched]).any():
            bad = touched[self._refs[touched] < taken[touched]][0]
            raise ValueError(f"page {bad} is released more often than it was taken")
        self._refs[touched] -= taken[touched]
        freed = touched[self._refs[touched] == 0]
        if freed.size:
            self._free.extend(freed[::-1].tolist())  # the lowest numbers are taken first
            counts = np.bincount(self._owner[freed], minlength=len(self._owner_names))
            for code in np.nonzero(counts)[0]:
                self._held[self._owner_names[code]] -= int(counts[code])
        return int(freed.size)

    # ----- block tables: [rows, blocks] arrays of page numbers, -1 = none ------------------
    def fork(
        self,
        tables: np.ndarray,
        parents: np.ndarray,
        shared: np.ndarray,
        first: np.ndarray,
        copy: np.ndarray,
        owner: str,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block tables of children of rows `parents` of `tables`, one child each entry.

        A `first` child takes over its parent's table; another shares its parent's first
        `shared` blocks (one more holder each) and, where `copy`, gets a fresh page as its next
        block, for a copy of the parent's partly filled one. Returns the new tables and the
        pages to copy: (sources, destinations)."""
        out = tables[parents]
        others = ~first
        common = out[others] if others.any() else out[:0]
        cols = np.arange(out.shape[1])[None, :]
        inside = cols < shared[others][:, None]
        self.share(common[inside])
        # Past the shared blocks a child's table is its own: the copy of the partial block.
        out[others] = np.where(inside, common, -1)
        rows = np.nonzero(copy)[0]
        dst = np.array(self.alloc(rows.size, owner), dtype=np.int64)
        src = tables[parents[rows], shared[rows]]
        out[rows, shared[rows]] = dst
        return out, src, dst

    # ----- typed views ---------------------------------------------------------------------
    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        """Every page seen as a `dtype` tensor of `shape` (its leading bytes): [num_pages, *shape].

        Writes through the view land in the pool; views of different shapes alias the same
        bytes, so a page must only be read through the view of the cache that holds it.
        """
        elem = torch.empty((), dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        nbytes = count * elem
        if nbytes > self.page_bytes:
            raise ValueError(
                f"a block of {shape} {dtype} needs {nbytes} B; pages hold {self.page_bytes}"
            )
        return self.buffer[:, :nbytes].view(dtype).view(self.num_pages, *shape)


def blocks_for(positions: int, block_positions: int) -> int:
    """Blocks needed to hold `positions` positions."""
    return -(-positions // block_positions)


def pages_for(positions: int, block_positions: int, rows: int = 1) -> int:
    """The most pages `rows` rows of up to `positions` cached positions each hold, a block a
    page and no block shared: the worst case both caches' reservations derive from."""
    return rows * blocks_for(positions, block_positions)


def _indices(pages: Iterable[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(pages if isinstance(pages, np.ndarray) else list(pages), dtype=np.int64)
    return idx.reshape(-1)
