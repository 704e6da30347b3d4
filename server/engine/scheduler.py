"""Who runs next, and how much of it: the engine's policy, with no tensors and no model.

The scheduler sees every piece of work (a generation, an `/embed`, a `/decode`) through the
same small interface (`Item`): its priority and arrival, its deadline and cancellation, and its
`Demand`, what it will need, computed once at submission:

- `pages`: pages of the memory budget held from admission to the end (a generation's KV cache
  for its whole prompt plus every sentence it may add, and its decoder rows for one sentence at
  the widest beam, which it needs from its first token to its last);
- `row_pages` × `rows`: decoder rows that start one at a time while pages are free, each
  holding its pages only while it decodes (a `/decode` job);
- `texts`: what must be encoded first (prompt sentences, `/embed` texts), as upper bounds of
  their token counts.

Each iteration the engine asks, in order: which items ended (`drop_ended`), which waiting items
start (`admit`: lowest priority value first, then arrival; the first that does not fit stops
admission, so a large request is never starved by small ones behind it), which texts to encode
(`plan_encoding`: prompt chunks and `/embed` chunks within a sentence and token budget, so a
2,000-sentence prompt is prefilled over many iterations while the others keep stepping), which
decode rows may start (`start_rows`), and whether the sentences that ended are completed now
(`completion_due`). Work that could never fit is refused at submission (`check`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:  # the policy itself needs no torch: the block manager is handed in
    from models.block_manager import BlockManager


class Status(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # admitted; its texts are being encoded (and prefilled) in chunks
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Demand:
    """What one item needs (see the module docstring)."""

    pages: int = 0
    row_pages: int = 0
    rows: int = 0
    texts: tuple[int, ...] = ()  # encode cost of each text, in tokens (an upper bound)


class Item(Protocol):
    priority: int
    arrival: int
    status: Status
    reserved_pages: int
    demand: Demand
    encoded: int  # texts of `demand.texts` encoded so far
    rows_started: int  # decode rows started so far

    @property
    def cancel_reason(self) -> str | None: ...  # set when its client cancels it

    def expired(self, now: float) -> bool: ...


W = TypeVar("W", bound=Item)


class QueueFull(RuntimeError):
    """More items wait than the queue holds."""


class NeverFits(ValueError):
    """The item needs more than the whole memory budget; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class TooMany(ValueError):
    """One request brings more items than the server ever holds at once (`capacity`)."""

    def __init__(self, count: int, capacity: int) -> None:
        super().__init__(f"{count} items; the server holds at most {capacity}")
        self.count = count
        self.capacity = capacity


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32  # items admitted at once (generations and SONAR jobs)
    max_waiting: int = 128  # items queued beyond that
    max_prefill_sentences: int = 64  # texts encoded per iteration (prompts and /embed)
    max_encode_tokens: int = 8192  # their tokens per iteration (an upper bound is counted)
    # Sentences that ended wait (each still streamed only once complete) until this fraction of
    # the running generations has one, or the decoder has nothing else to do, or
    # `completion_max_wait` iterations have passed: one re-encode and one model step then serve
    # them all. Both calls cost about the same for 1 row as for 16 (they read all the weights).
    completion_fraction: float = 0.5
    completion_max_wait: int = 16

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        if self.max_prefill_sentences < 1 or self.max_encode_tokens < 1:
            raise ValueError("max_prefill_sentences and max_encode_tokens must be >= 1")
        if not 0 <= self.completion_fraction <= 1 or self.completion_max_wait < 0:
            raise ValueError("completion_fraction in [0, 1], completion_max_wait >= 0")

    @property
    def capacity(self) -> int:
        """The most items the server ever holds at once (running and waiting): a request of
        more items than this could never be admitted, however long it retried."""
        return self.max_running + self.max_waiting


@dataclass
class EncodeChunk(Generic[W]):
    """Texts `start..end-1` of `item` are encoded this iteration."""

    item: W
    start: int
    end: int


@dataclass
class Scheduler(Generic[W]):
    config: SchedulerConfig
    blocks: BlockManager  # owned here: admission reserves its pages, the caches allocate them
    rows_in_flight: int = 0  # decode rows of jobs started and not yet done
    _rows_of: dict[int, int] = field(default_factory=dict)  # id(job) -> its rows in flight
    waiting: list[W] = field(default_factory=list)  # in admission order
    running: list[W] = field(default_factory=list)  # admitted, in admission order
    _ready_since: int | None = None

    @property
    def total_pages(self) -> int:
        return self.blocks.num_pages

    @property
    def reserved(self) -> int:
        """Pages promised to admitted items and started rows."""
        return self.blocks.reserved

    # ----- submission ----------------------------------------------------------------------
    def check(self, demand: Demand, pages_field: str, rows_field: str = "") -> None:
        """NeverFits if `demand` exceeds the whole budget, naming the field to change."""
        if demand.pages > self.total_pages:
            raise NeverFits(
                pages_field,
                f"needs {demand.pages} cache pages at worst; the server's cache memory holds "
                f"{self.total_pages}: lower it",
            )
        if demand.rows and demand.row_pages > self.total_pages:
            raise NeverFits(
                rows_field or pages_field,
                f"one row needs {demand.row_pages} cache pages at worst; the server's cache "
                f"memory holds {self.total_pages}: lower it",
            )

    def add(self, item: W) -> None:
        """Queue `item`; QueueFull when the queue (plus free running places) is full."""
        self.add_all([item])

    def add_all(self, items: list[W]) -> None:
        """Queue every item or none (one request's choices): QueueFull when they do not all
        fit now, TooMany when they could never fit."""
        capacity = self.config.capacity
        if len(items) > capacity:
            raise TooMany(len(items), capacity)
        free = max(self.config.max_running - len(self.running), 0)
        room = self.config.max_waiting + free - len(self.waiting)
        if len(items) > room:
            asked = f"; {len(items)} asked for" if len(items) > 1 else ""
            raise QueueFull(
                f"{len(self.waiting)} requests waiting (max_waiting {self.config.max_waiting})"
                + asked
            )
        for item in items:
            keys = [(w.priority, w.arrival) for w in self.waiting]
            self.waiting.insert(bisect.bisect(keys, (item.priority, item.arrival)), item)

    # ----- each iteration ------------------------------------------------------------------
    def drop_ended(self, now: float) -> list[tuple[W, str]]:
        """Items cancelled (their reason) or past their deadline ("timeout"), out of every
        queue with their pages back."""
        ended: list[tuple[W, str]] = []
        for item in (*self.waiting, *self.running):
            if item.cancel_reason is not None:
                ended.append((item, item.cancel_reason))
            elif item.expired(now):
                ended.append((item, "timeout"))
        for item, _ in ended:
            self.finish(item)
        return ended

    def admit(self) -> list[W]:
        """Waiting items that start now, in order, while places and pages last."""
        admitted: list[W] = []
        while self.waiting and len(self.running) < self.config.max_running:
            item = self.waiting[0]
            pages = item.demand.pages
            if not self.blocks.can_reserve(pages):
                break  # head of the line waits for pages; nobody overtakes it
            self.waiting.pop(0)
            self.blocks.reserve(pages)
            item.reserved_pages += pages
            item.status = Status.PREFILLING if item.demand.texts else Status.RUNNING
            self.running.append(item)
            admitted.append(item)
        return admitted

    def plan_encoding(self) -> list[EncodeChunk[W]]:
        """Texts to encode this iteration, oldest admitted first, within the budgets. At least
        one text always goes, so a text over the token budget still makes progress."""
        sentences = self.config.max_prefill_sentences
        tokens = self.config.max_encode_tokens
        plan: list[EncodeChunk[W]] = []
        for item in self.running:
            if item.status is not Status.PREFILLING:
                continue
            costs = item.demand.texts
            start = end = item.encoded
            while end < len(costs) and sentences > 0:
                if costs[end] > tokens and (plan or end > start):
                    break
                tokens -= costs[end]
                sentences -= 1
                end += 1
            if end > start:
                plan.append(EncodeChunk(item, start, end))
            if sentences <= 0 or tokens <= 0:
                break
            if end < len(costs):
                break  # this one continues next iteration; later ones wait behind it
        return plan

    def encoded(self, chunk: EncodeChunk[W]) -> None:
        """`chunk` was encoded: once all its texts are, the item runs."""
        item = chunk.item
        item.encoded = chunk.end
        if item.encoded >= len(item.demand.texts) and item.status is Status.PREFILLING:
            item.status = Status.RUNNING

    def start_rows(self, item: W) -> int:
        """How many more of `item`'s decode rows start now (their pages are reserved).

        A job's rows count like generations against `max_running`: the sentences decoding
        together are bounded, so a 256-row `/decode` takes its turn beside the streams instead
        of swelling every decoder step for all of them."""
        d = item.demand
        if item.status is not Status.RUNNING or not d.rows:
            return 0
        generations = sum(1 for i in self.running if not i.demand.rows)
        room = self.config.max_running - generations - self.rows_in_flight
        mine = self._rows_of.get(id(item), 0)
        if room < 1 and mine == 0:
            room = 1  # every admitted job always has a row going

        n = 0
        while item.rows_started + n < d.rows and n < room and self.blocks.can_reserve(d.row_pages):
            self.blocks.reserve(d.row_pages)
            item.reserved_pages += d.row_pages
            n += 1
        item.rows_started += n
        self.rows_in_flight += n
        self._rows_of[id(item)] = mine + n
        return n

    def row_done(self, item: W) -> None:
        """One of `item`'s decode rows ended: its pages go back."""
        pages = item.demand.row_pages
        item.reserved_pages -= pages
        self.blocks.unreserve(pages)
        self.rows_in_flight -= 1
        self._rows_of[id(item)] -= 1

    def finish(self, item: W) -> None:
        """`item` ended: out of the queues, every page it held back in the budget."""
        if item in self.waiting:
            self.waiting.remove(item)
        if item in self.running:
            self.running.remove(item)
        self.blocks.unreserve(item.reserved_pages)
        self.rows_in_flight -= self._rows_of.pop(id(item), 0)  # its rows end with it
        item.reserved_pages = 0
        item.status = Status.FINISHED

    # ----- completion batching -------------------------------------------------------------
    def completion_due(self, ready: int, decoding: int, iteration: int) -> bool:
        """Whether the `ready` sentences that ended are completed now (see SchedulerConfig)."""
        if not ready:
            self._ready_since = None
            return False
        if self._ready_since is None:
            self._ready_since = iteration
        running = sum(1 for i in self.running if i.status is Status.RUNNING and not i.demand.rows)
        due = (
            decoding == 0
            or bool(self.waiting)
            or ready >= self.config.completion_fraction * running
            or iteration - self._ready_since >= self.config.completion_max_wait
        )
        if due:
            self._ready_since = None
        return due

    # ----- gauges --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
