"""The scheduler's policy, without a model or torch: admission under the memory budget, chunked
prefill, deadlines, cancellation, priorities and completion batching."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from models.block_manager import PAGE_ALIGN, BlockManager
from server.engine.scheduler import (
    Demand,
    NeverFits,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    Status,
)


@dataclass(eq=False)
class Item:
    demand: Demand = field(default_factory=Demand)
    priority: int = 0
    arrival: int = 0
    status: Status = Status.WAITING
    cancel_reason: str | None = None
    reserved_pages: int = 0
    encoded: int = 0
    rows_started: int = 0
    deadline: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


_arrivals = iter(range(10**6))


def item(pages: int = 0, texts: int = 0, **kw: object) -> Item:
    kw.setdefault("arrival", next(_arrivals))
    return Item(Demand(pages=pages, texts=(10,) * texts), **kw)  # type: ignore[arg-type]


def sched(total: int = 100, **cfg: int | float) -> Scheduler[Item]:
    blocks = BlockManager(total, PAGE_ALIGN, "cpu")
    return Scheduler(SchedulerConfig(**cfg), blocks)  # type: ignore[arg-type]


def test_the_scheduler_imports_without_torch() -> None:
    code = "import sys, server.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_admission_stops_at_the_memory_budget_and_resumes_when_pages_return() -> None:
    s = sched(total=100)
    a, b, c = item(pages=60), item(pages=30), item(pages=20)
    for i in (a, b, c):
        s.add(i)
    assert s.admit() == [a, b]
    assert s.reserved == 90 and s.waiting == [c]
    assert s.admit() == []  # 90 + 20 > 100: c waits
    s.finish(b)
    assert s.reserved == 60 and b.status is Status.FINISHED and b.reserved_pages == 0
    assert s.admit() == [c]
    assert s.reserved == 80


def test_the_head_of_the_line_is_not_overtaken_by_smaller_items() -> None:
    s = sched(total=100)
    s.add(running := item(pages=50))
    s.admit()
    big, small = item(pages=80), item(pages=10)
    s.add(big)
    s.add(small)
    assert s.admit() == []  # small would fit, but big came first
    s.finish(running)
    assert s.admit() == [big, small]


def test_max_running_bounds_admission() -> None:
    s = sched(total=100, max_running=2)
    items = [item(pages=1) for _ in range(3)]
    for i in items:
        s.add(i)
    assert s.admit() == items[:2]
    assert s.num_waiting == 1


def test_a_request_that_could_never_fit_is_refused_naming_its_field() -> None:
    s = sched(total=100)
    with pytest.raises(NeverFits) as e:
        s.check(Demand(pages=101), "max_tokens")
    assert e.value.field == "max_tokens"
    with pytest.raises(NeverFits) as e:
        s.check(Demand(row_pages=101, rows=3), "embeddings", "beam_size")
    assert e.value.field == "beam_size"
    s.check(Demand(pages=100), "max_tokens")  # exactly the budget fits


def test_the_queue_is_bounded() -> None:
    s = sched(total=10, max_running=1, max_waiting=2)
    s.add(item(pages=10))
    s.admit()
    s.add(item())
    s.add(item())
    with pytest.raises(QueueFull):
        s.add(item())


def test_priorities_order_admission_then_arrival() -> None:
    s = sched(total=100, max_running=1)
    late_urgent = item(priority=-1)
    first, second = item(), item()
    s.add(first)
    s.add(second)
    s.add(late_urgent)
    assert s.waiting == [late_urgent, first, second]
    assert s.admit() == [late_urgent]


def test_long_prompts_are_prefilled_in_chunks_while_budget_lasts() -> None:
    s = sched(total=100, max_prefill_sentences=8)
    long, short = item(texts=20), item(texts=3)
    s.add(long)
    s.add(short)
    s.admit()
    assert long.status is Status.PREFILLING
    chunks = []
    for _ in range(3):
        plan = s.plan_encoding()
        chunks.append([(c.item is long, c.start, c.end) for c in plan])
        for c in plan:
            s.encoded(c)
    # The long prompt takes the budget in chunks; the short one follows it.
    assert chunks[0] == [(True, 0, 8)]
    assert chunks[1] == [(True, 8, 16)]
    assert chunks[2] == [(True, 16, 20), (False, 0, 3)]
    assert long.status is Status.RUNNING and short.status is Status.RUNNING
    assert s.plan_encoding() == []


def test_the_token_budget_bounds_a_chunk_but_one_text_always_goes() -> None:
    s = sched(total=100, max_encode_tokens=25)
    huge = Item(Demand(texts=(100, 5, 5)), arrival=next(_arrivals))
    s.add(huge)
    s.admit()
    plan = s.plan_encoding()
    assert [(c.start, c.end) for c in plan] == [(0, 1)]  # over budget, alone
    s.encoded(plan[0])
    plan = s.plan_encoding()
    assert [(c.start, c.end) for c in plan] == [(1, 3)]


def test_deadlines_and_cancellation_free_their_pages() -> None:
    s = sched(total=100)
    timed, cancelled, waiting = item(pages=40, deadline=5.0), item(pages=40), item(pages=40)
    for i in (timed, cancelled, waiting):
        s.add(i)
    s.admit()
    assert s.reserved == 80
    assert s.drop_ended(now=1.0) == []
    cancelled.cancel_reason = "cancelled"
    ended = s.drop_ended(now=6.0)
    assert {(id(i), why) for i, why in ended} == {
        (id(timed), "timeout"),
        (id(cancelled), "cancelled"),
    }
    assert s.reserved == 0
    assert s.admit() == [waiting]
    # A waiting item can time out too.
    queued = item(pages=100, deadline=7.0)
    s.add(queued)
    assert s.admit() == []
    assert s.drop_ended(now=8.0) == [(queued, "timeout")] and not s.waiting


def test_decode_rows_start_while_pages_are_free() -> None:
    s = sched(total=100)
    s.add(holder := item(pages=50))
    job = Item(Demand(row_pages=20, rows=5), arrival=next(_arrivals))
    s.add(job)
    assert s.admit() == [holder, job]
    assert s.start_rows(job) == 2  # 50 + 2 × 20 = 90; a third row would pass 100
    assert s.start_rows(job) == 0
    s.row_done(job)
    assert s.start_rows(job) == 1
    s.finish(holder)
    assert s.start_rows(job) == 2  # all five started
    assert s.start_rows(job) == 0
    assert s.reserved == 4 * 20  # four rows decode (one ended)
    s.finish(job)
    assert s.reserved == 0


def test_completion_waits_for_company_but_not_forever() -> None:
    s = sched(total=100, completion_fraction=0.5, completion_max_wait=3)
    items = [item() for _ in range(4)]
    for i in items:
        s.add(i)
    s.admit()
    assert not s.completion_due(ready=0, decoding=3, iteration=0)
    assert not s.completion_due(ready=1, decoding=3, iteration=0)  # 1 of 4 < half
    assert not s.completion_due(ready=1, decoding=3, iteration=2)
    assert s.completion_due(ready=1, decoding=3, iteration=3)  # waited 3 iterations
    assert s.completion_due(ready=2, decoding=2, iteration=4)  # half the running ones
    assert s.completion_due(ready=1, decoding=0, iteration=5)  # the decoder is idle
    s.add(item())
    assert s.completion_due(ready=1, decoding=3, iteration=6)  # someone waits for a place


def test_decode_rows_share_max_running_with_generations() -> None:
    s = sched(total=1000, max_running=6)
    gens = [item(pages=1) for _ in range(2)]
    job = Item(Demand(row_pages=1, rows=50), arrival=next(_arrivals))
    for i in (*gens, job):
        s.add(i)
    s.admit()
    assert s.start_rows(job) == 6 - 2  # four places left beside two generations
    assert s.start_rows(job) == 0
    s.row_done(job)
    assert s.start_rows(job) == 1
    s.finish(gens[0])
    assert s.start_rows(job) == 1
    s.finish(job)
    assert s.rows_in_flight == 0 and s.reserved == 1
