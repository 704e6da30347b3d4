"""The engine: one thread that runs the scheduler's plan through the runner.

Where things are: a request becomes work in the input processor (`prepare.py`); the scheduler
(`scheduler.py`) queues, admits and frees it with its block manager; the runner (`runner.py`)
makes the batched model calls; the stop rules and events are in `postprocess.py`; the asyncio
face is `stream.py`. `step()` is the glue, schedule → run → postprocess:

1. drop cancelled and timed-out items (their KV pages and decoder rows go with them);
2. admit waiting items (priority, then arrival) while places and pages last;
3. encode the planned texts in one call: prompt chunks (then prefilled into the KV cache in one
   batched `extend`) and `/embed` chunks, within a sentence and token budget, so a huge prompt or
   `/embed` spreads over iterations while the streams beside it keep going;
4. start the sentences whose hidden state is ready, and the `/decode` rows whose pages fit,
   in the decoder's token-level batch;
5. advance every decoder row by one token;
6. complete the sentences that ended (in batches: see `SchedulerConfig.completion_fraction`):
   re-encode, the stop rules, emit, one batched model step for those that go on.

A failure caused by one item's data ends that item alone (the runner retries item by item); a
failure of the loop itself fails every item and marks the engine dead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Hashable
from typing import Any, Literal

import torch
from prometheus_client import CollectorRegistry

from models.options import FinishReason, GenerationError
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded
from server.engine import memory
from server.engine.config import EngineConfig
from server.engine.metrics import EngineMetrics
from server.engine.postprocess import Outbox, complete
from server.engine.prepare import InputProcessor
from server.engine.request import (
    DecodeJob,
    DecodeRow,
    EmbedJob,
    EngineDead,
    EngineOverloaded,
    Generation,
    Request,
    Work,
)
from server.engine.runner import DecodeTask, EncodeTask, Outcome, Runner
from server.engine.scheduler import EncodeChunk, QueueFull, Scheduler, Status, TooMany
from server.engine.stream import EventStream, LoopThread, submit_all

__all__ = ["Engine", "EngineConfig", "EngineDead", "EngineOverloaded", "EventStream"]
log = logging.getLogger("sonar_llm.engine")


class Engine:
    """Continuous batching over one `SonarLLMPipeline`; `submit()` is the asyncio face."""

    def __init__(
        self,
        pipe: SonarLLMPipeline,
        config: EngineConfig | None = None,
        registry: CollectorRegistry | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        """`metrics` lets an owner that outlives engines (the app) keep one set of instruments."""
        self.pipe = pipe
        self.config = config or EngineConfig()
        self.registry = registry or CollectorRegistry()
        self.metrics = metrics or EngineMetrics(self.registry)
        blocks = memory.block_manager_for(pipe, self.config.cache_memory)
        self.scheduler: Scheduler[Work] = Scheduler(self.config, blocks)
        self.blocks = self.scheduler.blocks
        self.runner = Runner(pipe, self.blocks, self.config.encoder_cache_size)
        args = (self.config, self.scheduler, self.runner, self.metrics)
        self.processor = InputProcessor(pipe, *args)
        self.outbox = Outbox(self.metrics)
        self.metrics.cache_limit.set(self.blocks.capacity_bytes)
        self._ready: list[tuple[Generation, Decoded]] = []  # sentences that ended, not completed
        self._gone: list[Work] = []  # finished this iteration; their memory goes in `_sweep`
        self.cond = threading.Condition()  # guards the scheduler's queues across threads
        self.thread = LoopThread(self)
        self.iterations = 0

    # ----- lifecycle (the thread is `server.engine.stream.LoopThread`) ---------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; items still queued or running end with `cancelled`."""
        self.thread.stop(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.alive

    @property
    def has_work(self) -> bool:
        """Whether anything is queued or running."""
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def cache_bytes(self, kind: Literal["allocated", "used"] = "allocated") -> dict[str, int]:
        """Bytes of each cache: its pages, or the positions it holds (host-side numbers)."""
        return self.runner.cache_bytes(kind)

    # ----- submission (caller's thread) ----------------------------------------------------
    def prepare(self, request: Request) -> Work:
        """The work item for `request` (see `InputProcessor.prepare`); nothing is queued."""
        return self.processor.prepare(request)

    async def submit(self, work: Work) -> EventStream:
        """Queue prepared work (see `prepare`); its events come from the returned stream, whose
        `aclose()` cancels. EngineOverloaded comes before anything is queued."""
        return (await self.submit_all([work]))[0]

    async def submit_all(self, works: list[Work]) -> list[EventStream]:
        """Queue every item or none (one HTTP request's choices), as `submit` does one."""
        return await submit_all(self, works)

    def add(self, works: list[Work]) -> None:
        """Queue prepared work, all or none, so a large request never fills the queue half-way
        and is then withdrawn. The loop thread runs it, or, with no thread started, whoever
        calls `step()` (the offline `LLM`)."""
        with self.cond:
            if self.thread.stopping or self.error is not None:
                raise EngineDead("engine is not running")
            try:
                self.scheduler.add_all(works)
            except (TooMany, QueueFull) as e:
                raise refusal(e, self.metrics) from None
            self.metrics.waiting.set(self.scheduler.num_waiting)
            self.cond.notify_all()

    @property
    def error(self) -> BaseException | None:
        """Why the loop died (None while it runs, or after a clean stop)."""
        return self.thread.error

    def cancel(self, work: Work, reason: FinishReason = "cancelled") -> None:
        """Ask the loop to end `work` before its next iteration."""
        with self.cond:
            if work.cancel_reason is None and not work.finished:
                work.cancel_reason = reason
            self.cond.notify_all()

    # ----- the loop -------------------------------------------------------------------------
    def shutdown(self, error: BaseException | None) -> None:
        """End every item: `cancelled` when the loop stops, `error` when it failed."""
        with self.cond:
            items = [*self.scheduler.waiting, *self.scheduler.running]
        message = None if error is None else f"engine failed: {error}"
        for item in items:
            self._finish(item, "cancelled" if error is None else "error", message)
        with contextlib.suppress(Exception):
            self._sweep()
        self.outbox.flush()

    def step(self) -> None:
        """One iteration: schedule → run → postprocess (see the module docstring)."""
        t0 = time.perf_counter()
        with self.cond:
            ended = self.scheduler.drop_ended(t0)
            admitted = self.scheduler.admit()
        for item, why in ended:  # already out of the scheduler
            self._ended(item, why)  # type: ignore[arg-type]
        self._sweep()
        admit(admitted, self.runner, self.metrics)
        self._encode(self.scheduler.plan_encoding())
        self._start_rows()
        if self.runner.decoding:
            self.metrics.batch_size.observe(self.runner.decoding)
        self._decoded(self.runner.decode_step())
        self._complete_sentences()
        self._sweep()
        self.metrics.iteration_seconds.observe(time.perf_counter() - t0)
        self.iterations += 1
        self.metrics.update(self.scheduler, self.runner)
        self.outbox.flush()

    # ----- run: admission, encoding, decoding ----------------------------------------------
    def _encode(self, plan: list[EncodeChunk[Work]]) -> None:
        """Encode the planned texts in one call; prefill prompt chunks in one more."""
        chunks = {c.item: c for c in plan}
        cache = self.runner.encoder_cache
        hits, misses = cache.hits, cache.misses
        encoded = self.runner.encode(encode_tasks(plan))
        self.metrics.encoder_cache_hits.inc(cache.hits - hits)
        self.metrics.encoder_cache_misses.inc(cache.misses - misses)
        self._failed(encoded.errors)
        prefill = prefill_rows(chunks, encoded, self.pipe.codec.device)
        for work, vectors in encoded.results.items():
            if isinstance(work, EmbedJob):
                work.vectors.append(vectors.float().cpu())
                self.scheduler.encoded(chunks[work])
                if work.status is Status.RUNNING:  # every text is encoded
                    self._finish(work, "stop", result=torch.cat(work.vectors))
        stepped = self.runner.extend(prefill, "prefill")
        self._failed(stepped.errors)
        starting: list[Generation] = []
        for work, hidden in stepped.results.items():
            assert isinstance(work, Generation)
            self.scheduler.encoded(chunks[work])
            if work.status is Status.RUNNING:  # the whole prompt is in the cache
                work.hidden = hidden
                starting.append(work)
        self._start_sentences(starting)

    def _start_sentences(self, gens: list[Generation]) -> None:
        """Project each request's hidden state and start decoding its next sentence."""
        if not gens:
            return
        predicted = self.pipe.model.project(torch.stack([g.next_input() for g in gens]))
        tasks = {
            g: DecodeTask(predicted[i], g.options.target_lang, g.options.decode_for(len(g.outputs)))
            for i, g in enumerate(gens)
        }
        self._decoded(self.runner.start_decoding(tasks))  # type: ignore[arg-type]

    def _start_rows(self) -> None:
        """`/decode` rows whose pages fit join the decoder."""
        tasks: dict[Hashable, DecodeTask] = {}
        for job in list(self.scheduler.running):
            if isinstance(job, DecodeJob):
                first = job.rows_started
                for i in range(first, first + self.scheduler.start_rows(job)):
                    tasks[DecodeRow(job, i)] = job.task(i)
        if tasks:
            self._decoded(self.runner.start_decoding(tasks))

    def _decoded(self, outcome: Any) -> None:
        """Sentences (and `/decode` rows) that ended in the decoder."""
        self._failed(outcome.errors)
        for key, decoded in outcome.results.items():
            if isinstance(key, Generation):
                if not key.finished:
                    self._ready.append((key, decoded))
                continue
            job = key.job
            if job.finished:
                continue
            job.record(key.index, decoded)
            self.metrics.decoded_tokens.inc(decoded.num_tokens)
            self.scheduler.row_done(job)
            if job.done_rows == job.rows:
                self._finish(job, "stop", result=[r for r in job.results if r is not None])

    # ----- postprocess ---------------------------------------------------------------------
    def _complete_sentences(self) -> None:
        """Sentences that ended, once enough are ready: the stop rules (`complete`), and one
        batched model step for the requests that go on, which then start their next sentence."""
        self._ready = [(g, d) for g, d in self._ready if not g.finished]
        due = self.scheduler.completion_due(len(self._ready), self.runner.decoding, self.iterations)
        if not due:
            return
        ready, self._ready = self._ready, []
        ends, going_on = complete(ready, self.runner, self.pipe.eos_embedding, self.outbox)
        for gen, reason, error in ends:
            self._finish(gen, reason, error)
        stepped = self.runner.extend(going_on)
        self._failed(stepped.errors)
        for gen, hidden in stepped.results.items():
            gen.hidden = hidden
        self._start_sentences(list(stepped.results))

    # ----- ending --------------------------------------------------------------------------
    def _failed(self, errors: dict[Any, str]) -> None:
        for key, why in errors.items():
            self._finish(owner(key), "error", why)

    def _finish(
        self, work: Work, reason: FinishReason, error: str | None = None, **kw: Any
    ) -> None:
        """End `work`: out of the scheduler, its final event out, its memory back in `_sweep`."""
        if work.finished:
            return
        with self.cond:
            self.scheduler.finish(work)
        self._ended(work, reason, error, **kw)

    def _ended(self, work: Work, reason: FinishReason, error: str | None = None, **kw: Any) -> None:
        self._gone.append(work)
        if isinstance(work, Generation):
            work.hidden = None
        self.outbox.final(work, reason, error, **kw)

    def _sweep(self) -> None:
        """Finished items give back their KV pages and decoder rows."""
        if not self._gone:
            return
        gone, self._gone = self._gone, []
        ids = {id(w) for w in gone}
        gens: set[Hashable] = {w for w in gone if isinstance(w, Generation)}
        self.runner.drop(gens, lambda key: id(owner(key)) in ids)


def encode_tasks(plan: list[EncodeChunk[Work]]) -> dict[Work, EncodeTask]:
    """The texts each planned chunk encodes (a prompt's given vectors need none)."""
    tasks: dict[Work, EncodeTask] = {}
    for c in plan:
        work = c.item
        if isinstance(work, Generation):
            end = min(c.end, len(work.sentences))  # beyond: given vectors
            texts = work.sentences[c.start : end]
            langs = [work.prompt_lang(i) for i in range(c.start, end)]
            if texts:
                tasks[work] = EncodeTask(texts, langs)
        elif isinstance(work, EmbedJob):
            texts = work.texts[c.start : c.end]
            tasks[work] = EncodeTask(texts, [work.lang] * len(texts))
    return tasks


def admit(admitted: list[Work], runner: Runner, metrics: EngineMetrics) -> None:
    """Admitted items start: their queue time, and a generation's KV sequence."""
    now = time.perf_counter()
    for work in admitted:
        work.usage.queue_time = now - work.submitted
        metrics.queue_time.observe(work.usage.queue_time)
        if isinstance(work, Generation):
            work.admitted(runner.pipe.model.device)
            metrics.prompt_sentences.inc(work.prompt_length)
            runner.kv.add(work)


def prefill_rows(
    chunks: dict[Work, EncodeChunk[Work]],
    encoded: Outcome[Work, torch.Tensor],
    device: torch.device,
) -> dict[Work, torch.Tensor]:
    """Each planned prompt chunk's context rows: its encoded sentences, then its given vectors."""
    rows: dict[Work, torch.Tensor] = {}
    for gen, chunk in chunks.items():
        if not isinstance(gen, Generation) or gen in encoded.errors:
            continue
        n = len(gen.sentences)
        got = encoded.results.get(gen)
        parts = [] if got is None else [got]
        if gen.given is not None and chunk.end > n:
            given = gen.given[max(chunk.start - n, 0) : chunk.end - n]
            parts.append(given.to(device=device, dtype=torch.float32))
        rows[gen] = torch.cat(parts)
    return rows


def owner(key: Hashable) -> Work:
    """The work item a runner key belongs to (a generation, or a `/decode` row's job)."""
    if isinstance(key, DecodeRow):
        return key.job
    assert isinstance(key, Work)
    return key


def refusal(e: TooMany | QueueFull, metrics: EngineMetrics) -> Exception:
    """What `Engine.add` raises when the scheduler refuses work."""
    if isinstance(e, QueueFull):
        metrics.rejected.labels("queue_full").inc()
        return EngineOverloaded(str(e), retry_after=1.0)
    metrics.rejected.labels("too_large").inc()
    return GenerationError(
        "n",
        f"asks for {e.count} generations; this server holds at most {e.capacity} at once "
        "(max_running + max_waiting)",
    )
