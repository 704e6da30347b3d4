"""The engine: one thread that runs the scheduler's plan through the runner, and the asyncio face.

Every piece of work (a generation, an `/embed`, a `/decode`) goes through `submit()`, waits in
the scheduler's queue, is admitted when its worst-case memory fits the cache budget, and sends
its events back to the caller's event loop. Each iteration:

1. drop cancelled and timed-out items (their KV pages and decoder rows go with them);
2. admit waiting items (priority, then arrival) while places and pages last;
3. encode the planned texts in one call: prompt chunks (then prefilled into the KV cache in one
   batched `extend`) and `/embed` chunks, within a sentence and token budget, so a huge prompt or
   `/embed` spreads over iterations while the streams beside it keep going;
4. start the sentences whose hidden state is ready, and the `/decode` rows whose pages fit,
   in the decoder's token-level batch;
5. advance every decoder row by one token;
6. complete the sentences that ended (in batches: see `SchedulerConfig.completion_fraction`):
   re-encode, EOS and length checks, emit, one batched model step for those that go on.

A failure caused by one item's data ends that item alone (the runner retries item by item); a
failure of the loop itself fails every item and marks the engine dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from models.block_manager import BlockManager, page_bytes_for
from models.generate import (
    add_latent_noise,
    cut_at_stop,
    eos_similarity,
    prompt_sentences,
    repeats_earlier,
)
from models.options import FinishReason, GenerationError
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded, UnknownLanguageError
from server.engine import memory
from server.engine.metrics import EngineMetrics
from server.engine.request import (
    DecodeJob,
    DecodeRequest,
    DecodeRow,
    EmbedJob,
    EmbedRequest,
    Event,
    FinalEvent,
    GenerationRequest,
    SentenceEvent,
    Sequence,
    Work,
)
from server.engine.runner import DECODER, LLM, DecodeTask, EncodeTask, Runner
from server.engine.scheduler import (
    Demand,
    EncodeChunk,
    NeverFits,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    Status,
    TooMany,
)

log = logging.getLogger("sonar_llm.engine")

Request = GenerationRequest | EmbedRequest | DecodeRequest
# SONAR embeddings are mean-pooled outputs of a layer-normalised encoder: each value is of order
# 0.1 at most. 100 leaves three orders of magnitude for edited or interpolated vectors while
# keeping the decoder's activations far from overflow (its layer norms square them: fp16
# overflows near 256 per value over 1024 dimensions, fp32 near 1e19).
MAX_EMBEDDING_ABS = 100.0


class EngineOverloaded(RuntimeError):
    """The queue is full: the HTTP layer answers 503 with Retry-After."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(f"server overloaded: {reason}")
        self.reason = reason
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The scheduling loop is not running (stopped, or crashed)."""


@dataclass(frozen=True)
class EngineConfig(SchedulerConfig):
    """The scheduler's settings plus what the engine itself owns."""

    # Bytes for the SONAR-LLM KV cache and the decoder's cache together; None: a share of the
    # memory that is free once the model is loaded (see `server.engine.memory`).
    cache_memory: int | None = None
    encoder_cache_size: int = 10_000
    # CPython's GIL switch interval while the engine runs (see `Engine.start`); None: leave it.
    gil_switch_interval: float | None = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_memory is not None and self.cache_memory < 1:
            raise ValueError("cache_memory must be a positive number of bytes")
        if self.gil_switch_interval is not None and not self.gil_switch_interval > 0:
            raise ValueError("gil_switch_interval must be > 0 seconds (or None)")


class EventStream:
    """One item's events: iterate, or `next(timeout)`; `aclose()` before the end cancels."""

    def __init__(self, engine: Engine, work: Work, queue: asyncio.Queue[Event]) -> None:
        self._engine = engine
        self._work = work
        self._queue = queue
        self._done = False

    @property
    def request_id(self) -> str:
        return self._work.request_id

    @property
    def prompt_sentences(self) -> int:
        return self._work.prompt_length if isinstance(self._work, Sequence) else 0

    @property
    def prompt(self) -> list[str]:
        """The prompt's sentences as the model sees them ("Begin of text." first when added;
        given vectors, which have no text, are not listed)."""
        return list(self._work.sentences) if isinstance(self._work, Sequence) else []

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        return self._take(await self._queue.get())

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        if self._done:
            raise StopAsyncIteration
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        return self._take(event)

    async def result(self) -> FinalEvent:
        """Wait for the final event (a job's answer)."""
        async for event in self:
            if isinstance(event, FinalEvent):
                return event
        raise RuntimeError("event stream ended without a final event")

    def _take(self, event: Event) -> Event:
        if isinstance(event, FinalEvent):
            self._done = True
        return event

    async def aclose(self) -> None:
        """Cancel the item unless it already finished."""
        if not self._done:
            self._done = True
            self._engine.cancel(self._work)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


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
        self.scheduler: Scheduler[Work] = Scheduler(self.config, self._make_blocks())
        self.blocks = self.scheduler.blocks
        self.runner = Runner(pipe, self.blocks, self.config.encoder_cache_size)
        self.metrics.cache_limit.set(self.blocks.capacity_bytes)
        self._ready: list[tuple[Sequence, Decoded]] = []  # sentences that ended, not completed
        self._gone: list[Work] = []  # finished this iteration; their memory goes in `_sweep`
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.iterations = 0
        # Events wait here until the iteration's state (batch, gauges) is updated, so a client
        # that sees its final event also sees itself gone from the running count.
        self._outbox: list[tuple[Work, Event]] = []

    def _make_blocks(self) -> BlockManager:
        codec, model = self.pipe.codec, self.pipe.model
        widths = [model.kv_bytes_per_position(), codec.decoder_stack.bytes_per_position()]
        page = page_bytes_for(widths)
        budget = self.config.cache_memory
        if budget is None:
            budget = memory.default_cache_memory(model.device)
        pool = BlockManager.with_capacity(budget, page, model.device)
        log.info(
            "cache memory: %s in %d pages of %s (SONAR-LLM KV cache and SONAR decoder)",
            memory.format_bytes(pool.capacity_bytes),
            pool.num_pages,
            memory.format_bytes(page),
        )
        return pool

    # ----- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        interval = self.config.gil_switch_interval
        if interval is not None and sys.getswitchinterval() > interval:
            # The loop thread runs Python between short tensor ops almost without pause; at
            # CPython's default 5 ms switch interval the event loop beside it (HTTP, SSE,
            # submissions) waits up to 5 ms for each turn. Process-wide, hence only lowered.
            sys.setswitchinterval(interval)
        self._thread = threading.Thread(target=self._run, name="sonar-llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; items still queued or running end with `cancelled`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

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

    def cache_bytes(self) -> dict[str, int]:
        """Allocated bytes of each cache (host-side numbers: no device sync)."""
        return {LLM: self.blocks.held_bytes(LLM), DECODER: self.blocks.held_bytes(DECODER)}

    def kv_cache_bytes(self) -> int:
        """Bytes holding SONAR-LLM context."""
        return self.runner.kv.used_bytes()

    # ----- asyncio face --------------------------------------------------------------------
    async def submit(self, request: Request) -> EventStream:
        """Queue `request`; its events come from the returned stream, whose `aclose()` cancels.

        Raises GenerationError for bad fields (including work that could never fit the cache
        memory) and EngineOverloaded when the queue is full, both before anything is queued.
        """
        return (await self.submit_all([request]))[0]

    async def submit_all(self, requests: list[Request]) -> list[EventStream]:
        """Queue every request or none (one HTTP request's choices), as `submit` does one.

        Several requests are admitted to the queue together, so a large one never fills the
        queue half-way (refusing the small requests beside it) and is then withdrawn. More
        than the server ever holds (`config.capacity`) is a GenerationError naming `n`.
        """
        works: list[Work] = []
        for request in requests:
            if isinstance(request, GenerationRequest) and long_prompt(request.prompt):
                # Splitting a long prompt takes a while: not on the event loop the streams use.
                works.append(await asyncio.to_thread(self.prepare, request))
            else:
                works.append(self.prepare(request))
        loop = asyncio.get_running_loop()
        streams = [self._stream_for(work, loop) for work in works]
        if self._thread is None:
            raise EngineDead("engine is not running")
        self.add(works)
        return streams

    def _stream_for(self, work: Work, loop: asyncio.AbstractEventLoop) -> EventStream:
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # A RuntimeError means the client's event loop is gone: nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        work.emit = emit
        return EventStream(self, work, queue)

    def cancel(self, work: Work, reason: FinishReason = "cancelled") -> None:
        """Ask the loop to end `work` before its next iteration."""
        with self._cond:
            if work.cancel_reason is None and not work.finished:
                work.cancel_reason = reason
            self._cond.notify_all()

    # ----- submission (caller's thread) ----------------------------------------------------
    def prepare(self, request: Request) -> Work:
        """The work item for `request`, every field checked (GenerationError names a bad one);
        nothing is queued. Its events go to `work.emit`."""
        if request.timeout is not None and not request.timeout > 0:
            raise GenerationError("timeout", f"must be > 0 seconds, got {request.timeout}")
        common: dict[str, Any] = {
            "request_id": request.request_id,
            "priority": request.priority,
            "timeout": request.timeout,
        }
        work: Work
        if isinstance(request, GenerationRequest):
            work = self._prepare_generation(request, common)
        elif isinstance(request, EmbedRequest):
            self._check_lang("lang", request.lang)
            texts = list(request.texts)
            work = EmbedJob(
                **common,
                texts=texts,
                lang=request.lang,
                demand=Demand(texts=tuple(_token_bound(t) for t in texts)),
            )
        else:
            work = self._prepare_decode(request, common)
        return work

    def _prepare_generation(self, request: GenerationRequest, common: dict[str, Any]) -> Sequence:
        opts = request.options
        self.pipe.check_options(opts)
        add_begin = self.pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
        given = request.prompt_embeddings
        if given is not None:
            self._check_embeddings("prompt_embeddings", given)
            given = given.float().cpu()
        n_given = 0 if given is None else int(given.shape[0])
        sentences = prompt_sentences(request.prompt, opts.source_lang, add_begin, n_given)
        llm = self.runner.llm_pages(len(sentences) + n_given + opts.max_sentences)
        beam = opts.decode.beam_size if not opts.decode.sampling else 1
        decoder = self.runner.decoder_pages(beam, opts.decode.max_tokens)
        # A given vector costs no encoding (0 tokens): it joins the prefill as it is.
        costs = tuple(_token_bound(s) for s in sentences) + (0,) * n_given
        demand = Demand(pages=llm + decoder, texts=costs)
        if llm > self.scheduler.total_pages:
            field = "prompt"
        elif self.runner.decoder_pages(1, opts.decode.max_tokens) + llm > (
            self.scheduler.total_pages
        ):
            field = "max_tokens"
        else:
            field = "beam_size"
        self._check_fits(demand, field)
        return Sequence(
            **common,
            request=request,
            sentences=sentences,
            given=given,
            add_begin=add_begin,
            demand=demand,
        )

    def _check_embeddings(self, name: str, emb: torch.Tensor) -> None:
        """SONAR vectors from a client: [N, D] rows of finite values of bounded size."""
        if emb.ndim != 2 or emb.shape[1] != self.pipe.codec.embed_dim:
            raise GenerationError(
                name,
                f"must be rows of {self.pipe.codec.embed_dim} values, got shape {list(emb.shape)}",
            )
        if not bool(torch.isfinite(emb).all()):
            raise GenerationError(name, "must be finite numbers")
        largest = float(emb.abs().max()) if emb.numel() else 0.0
        if largest > MAX_EMBEDDING_ABS:
            raise GenerationError(
                name,
                f"has a value of magnitude {largest:.3g}; SONAR embeddings stay far below "
                f"{MAX_EMBEDDING_ABS:g} (values this large only overflow the decoder)",
            )

    def _prepare_decode(self, request: DecodeRequest, common: dict[str, Any]) -> DecodeJob:
        self._check_lang("lang", request.lang)
        emb = request.embeddings
        self._check_embeddings("embeddings", emb)
        o = request.options
        row_pages = self.runner.decoder_pages(1 if o.sampling else o.beam_size, o.max_tokens)
        demand = Demand(row_pages=row_pages, rows=int(emb.shape[0]))
        self._check_fits(demand, "beam_size")
        return DecodeJob(
            **common,
            embeddings=emb.float().cpu(),
            lang=request.lang,
            options=o,
            demand=demand,
            results=[None] * int(emb.shape[0]),
        )

    def _check_lang(self, field: str, lang: str) -> None:
        try:
            self.pipe.codec.check_lang(lang)
        except UnknownLanguageError as e:
            raise GenerationError(field, str(e)) from None

    def _check_fits(self, demand: Demand, field: str) -> None:
        try:
            self.scheduler.check(demand, field)
        except NeverFits as e:
            self.metrics.rejected.labels("too_large").inc()
            page = self.blocks.page_bytes
            need = (
                f"each row needs up to {memory.format_bytes(demand.row_pages * page)}"
                if demand.rows
                else f"this request needs up to {memory.format_bytes(demand.pages * page)}"
            )
            raise GenerationError(
                e.field,
                f"{need} of cache memory at worst; the server's cache memory is "
                f"{memory.format_bytes(self.blocks.capacity_bytes)}: lower {e.field}",
            ) from None

    def add(self, works: list[Work]) -> None:
        """Queue prepared work, all or none (GenerationError, EngineOverloaded). The loop thread
        runs it, or, with no thread started, whoever calls `step()` (the offline `LLM`)."""
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineDead("engine is not running")
            try:
                self.scheduler.add_all(works)
            except TooMany as e:
                self.metrics.rejected.labels("too_large").inc()
                raise GenerationError(
                    "n",
                    f"asks for {e.count} generations; this server holds at most {e.capacity} "
                    "at once (max_running + max_waiting)",
                ) from None
            except QueueFull as e:
                self.metrics.rejected.labels("queue_full").inc()
                raise EngineOverloaded(str(e), retry_after=1.0) from None
            self.metrics.waiting.set(self.scheduler.num_waiting)
            self._cond.notify_all()

    # ----- the loop (engine thread) --------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self.scheduler.waiting or self.scheduler.running):
                        self._cond.wait()
                    if self._stopping:
                        break
                self.step()
            self._shutdown(None)
        except BaseException as e:  # the loop itself failed: nothing can be trusted any more
            log.exception("engine loop died")
            self.error = e
            self._shutdown(e)

    def _shutdown(self, error: BaseException | None) -> None:
        with self._cond:
            items = [*self.scheduler.waiting, *self.scheduler.running]
        message = None if error is None else f"engine failed: {error}"
        for item in items:
            self._finish(item, "cancelled" if error is None else "error", message)  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            self._sweep()
        self._flush()

    def step(self) -> None:
        """One iteration (see the module docstring)."""
        t0 = time.perf_counter()
        with self._cond:
            ended = self.scheduler.drop_ended(t0)
            admitted = self.scheduler.admit()
        for item, why in ended:
            self._finish(item, why)  # type: ignore[arg-type]
        self._sweep()
        self._admit(admitted)
        self._encode(self.scheduler.plan_encoding())
        self._start_rows()
        if self.runner.decoding:
            self.metrics.batch_size.observe(self.runner.decoding)
        self._decode_step()
        self._complete_sentences()
        self._sweep()
        self.metrics.iteration_seconds.observe(time.perf_counter() - t0)
        self.iterations += 1
        self._update_gauges()
        self._flush()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for work, event in outbox:
            try:
                work.emit(event)
            except Exception:  # a broken listener must not take the loop down
                log.exception("could not deliver an event to request %s", work.request_id)

    def _update_gauges(self) -> None:
        m, pool, kv = self.metrics, self.blocks, self.runner.kv
        m.running.set(self.scheduler.num_running)
        m.waiting.set(self.scheduler.num_waiting)
        decoder = self.runner.decoder
        m.cache_bytes.labels(LLM, "allocated").set(pool.held_bytes(LLM))
        m.cache_bytes.labels(LLM, "used").set(kv.used_bytes())
        m.cache_bytes.labels(DECODER, "allocated").set(pool.held_bytes(DECODER))
        m.cache_bytes.labels(DECODER, "used").set(decoder.used_bytes())
        m.cache_reserved.set(pool.reserved * pool.page_bytes)
        m.cache_usage.set(pool.used_pages / pool.num_pages)
        m.decoder_rows.set(decoder.num_rows)

    # ----- admission and encoding ----------------------------------------------------------
    def _admit(self, admitted: list[Work]) -> None:
        now = time.perf_counter()
        for work in admitted:
            work.usage.queue_time = now - work.submitted
            self.metrics.queue_time.observe(work.usage.queue_time)
            if isinstance(work, Sequence):
                work.started = now
                work.usage.prompt_sentences = work.prompt_length
                work.latent_rng = work.options.latent_generator(self.pipe.model.device)
                self.metrics.prompt_sentences.inc(work.prompt_length)
                self.runner.kv.add(work)

    def _encode(self, plan: list[EncodeChunk[Work]]) -> None:
        """Encode the planned texts in one call; prefill prompt chunks in one more."""
        chunks = {c.item: c for c in plan}
        tasks: dict[Work, EncodeTask] = {}
        for work, c in chunks.items():
            if isinstance(work, Sequence):
                end = min(c.end, len(work.sentences))  # beyond: given vectors
                texts = work.sentences[c.start : end]
                langs = [work.prompt_lang(i) for i in range(c.start, end)]
                if not texts:
                    continue
            else:
                assert isinstance(work, EmbedJob)
                texts = work.texts[c.start : c.end]
                langs = [work.lang] * len(texts)
            tasks[work] = EncodeTask(texts, langs)
        hits, misses = self.runner.encoder_cache.hits, self.runner.encoder_cache.misses
        encoded = self.runner.encode(tasks)
        self.metrics.encoder_cache_hits.inc(self.runner.encoder_cache.hits - hits)
        self.metrics.encoder_cache_misses.inc(self.runner.encoder_cache.misses - misses)
        for work, why in encoded.errors.items():
            self._finish(work, "error", why)
        prefill: dict[Work, torch.Tensor] = {}
        for work, c in chunks.items():
            if isinstance(work, Sequence) and work not in encoded.errors:
                prefill[work] = self._prompt_vectors(work, c, encoded.results.get(work))
        for work, vectors in encoded.results.items():
            if isinstance(work, Sequence):
                continue
            assert isinstance(work, EmbedJob)
            work.vectors.append(vectors.float().cpu())
            self.scheduler.encoded(chunks[work])
            if work.status is Status.RUNNING:  # every text is encoded
                self._finish(work, "stop", result=torch.cat(work.vectors))
        stepped = self.runner.extend(prefill, "prefill")
        for work, why in stepped.errors.items():
            self._finish(work, "error", why)
        starting: list[Sequence] = []
        for work, hidden in stepped.results.items():
            assert isinstance(work, Sequence)
            self.scheduler.encoded(chunks[work])
            if work.status is Status.RUNNING:  # the whole prompt is in the cache
                work.hidden = hidden
                starting.append(work)
        self._start_sentences(starting)

    def _prompt_vectors(
        self, seq: Sequence, chunk: EncodeChunk[Work], encoded: torch.Tensor | None
    ) -> torch.Tensor:
        """A prompt chunk's context rows: its encoded sentences, then its given vectors."""
        n = len(seq.sentences)
        parts = [] if encoded is None else [encoded]
        if seq.given is not None and chunk.end > n:
            rows = seq.given[max(chunk.start - n, 0) : chunk.end - n]
            parts.append(rows.to(device=self.pipe.codec.device, dtype=torch.float32))
        return torch.cat(parts)

    # ----- decoding at token level ---------------------------------------------------------
    def _start_sentences(self, seqs: list[Sequence]) -> None:
        """Project each request's hidden state and start decoding its next sentence."""
        if not seqs:
            return
        hidden = torch.stack(
            [
                add_latent_noise(s.hidden, s.options.latent_temperature, s.latent_rng)
                for s in seqs
                if s.hidden is not None
            ]
        )
        assert hidden.shape[0] == len(seqs), "every sentence that starts has a hidden state"
        for s in seqs:
            s.hidden = None
        predicted = self.pipe.model.project(hidden)
        tasks = {
            s: DecodeTask(predicted[i], s.options.target_lang, s.options.decode_for(len(s.outputs)))
            for i, s in enumerate(seqs)
        }
        self._started(self.runner.start_decoding(tasks))  # type: ignore[arg-type]

    def _start_rows(self) -> None:
        """`/decode` rows whose pages fit join the decoder."""
        tasks: dict[Hashable, DecodeTask] = {}
        for work in list(self.scheduler.running):
            if not isinstance(work, DecodeJob):
                continue
            first = work.rows_started
            n = self.scheduler.start_rows(work)
            assert work.embeddings is not None
            for i in range(first, first + n):
                tasks[DecodeRow(work, i)] = DecodeTask(work.embeddings[i], work.lang, work.options)
        if tasks:
            self._started(self.runner.start_decoding(tasks))

    def _started(self, outcome: Any) -> None:
        for key, why in outcome.errors.items():
            self._finish(_owner(key), "error", why)
        for key, decoded in outcome.results.items():
            self._sentence_ended(key, decoded)

    def _decode_step(self) -> None:
        """One token for every decoder row; sentences that ended go on."""
        outcome = self.runner.decode_step()
        for key, why in outcome.errors.items():
            self._finish(_owner(key), "error", why)
        for key, decoded in outcome.results.items():
            self._sentence_ended(key, decoded)

    def _sentence_ended(self, key: Hashable, decoded: Decoded) -> None:
        if isinstance(key, DecodeRow):
            job = key.job
            if job.finished:
                return
            job.results[key.index] = decoded
            job.usage.decoded_tokens += decoded.num_tokens
            self.metrics.decoded_tokens.inc(decoded.num_tokens)
            self.scheduler.row_done(job)
            if job.done_rows == job.rows:
                self._finish(job, "stop", result=[r for r in job.results if r is not None])
            return
        assert isinstance(key, Sequence)
        if not key.finished:
            self._ready.append((key, decoded))

    # ----- completing sentences ------------------------------------------------------------
    def _complete_sentences(self) -> None:
        """For every sentence that ended: re-encode, EOS and length checks, emit, and one batched
        model step for the requests that go on, which then start their next sentence."""
        self._ready = [(s, d) for s, d in self._ready if not s.finished]
        if not self.scheduler.completion_due(
            len(self._ready), self.runner.decoding, self.iterations
        ):
            return
        ready, self._ready = self._ready, []
        reencoded = self.runner.encode(
            {s: EncodeTask([d.text], [s.options.target_lang]) for s, d in ready}
        )
        for seq, why in reencoded.errors.items():
            self._finish(seq, "error", why.replace("encode", "re-encode", 1))
        done = [(s, d, reencoded.results[s][0]) for s, d in ready if s in reencoded.results]
        if not done:
            return
        # One similarity computation (one device sync) for all of them.
        sims = eos_similarity(
            torch.stack([e for _, _, e in done]),
            torch.stack([self.pipe.eos_embedding(s.options.eos_text) for s, _, _ in done]),
        ).tolist()
        now = time.perf_counter()
        going_on: dict[Sequence, torch.Tensor] = {}
        for (seq, d, emb), sim in zip(done, sims, strict=True):
            seq.usage.decoded_tokens += d.num_tokens
            self.metrics.decoded_tokens.inc(d.num_tokens)
            if sim >= seq.options.eos_threshold:
                self._finish(seq, "stop")
                continue
            if repeats_earlier(emb, seq.generated, seq.options.repetition_threshold):
                self.metrics.repetition_stops.inc()
                self._finish(seq, "repetition")
                continue
            cut = cut_at_stop(d.text, seq.options.stop)
            if cut is not None:  # a stop string: the sentence ends before it, and so does all
                if cut:
                    self._emit_sentence(seq, replace(d, text=cut), emb, now)
                self._finish(seq, "stop")
                continue
            self._emit_sentence(seq, d, emb, now)
            if len(seq.outputs) >= seq.options.max_sentences:
                self._finish(seq, "length")
            else:
                going_on[seq] = emb[None]
        stepped = self.runner.extend(going_on)  # type: ignore[arg-type]
        for seq, why in stepped.errors.items():
            self._finish(seq, "error", why)
        starting = []
        for seq, hidden in stepped.results.items():
            seq.hidden = hidden
            starting.append(seq)
        self._start_sentences(starting)  # type: ignore[arg-type]

    def _emit_sentence(self, seq: Sequence, d: Decoded, emb: torch.Tensor, now: float) -> None:
        if seq.usage.time_to_first_sentence is None:
            seq.usage.time_to_first_sentence = now - seq.submitted
            self.metrics.time_to_first_sentence.observe(seq.usage.time_to_first_sentence)
        elif seq.last_emit is not None:
            self.metrics.inter_sentence_latency.observe(now - seq.last_emit)
        seq.last_emit = now
        assert seq.request is not None
        embedding = emb.float().cpu().tolist() if seq.request.return_embeddings else None
        event = SentenceEvent(
            index=len(seq.outputs),
            text=d.text,
            num_tokens=d.num_tokens,
            embedding=embedding,
            elapsed=now - seq.submitted,
        )
        self._outbox.append((seq, event))
        seq.outputs.append(d.text)
        if seq.options.repetition_threshold is not None:
            seq.generated.append(emb)
        self.metrics.sentences.inc()

    # ----- ending --------------------------------------------------------------------------
    def _finish(
        self,
        work: Work,
        reason: FinishReason,
        error: str | None = None,
        result: torch.Tensor | list[Decoded] | None = None,
    ) -> None:
        if work.ended:
            return
        work.ended = True
        with self._cond:
            self.scheduler.finish(work)  # (already done for what `drop_ended` returned)
        self._gone.append(work)
        outputs = list(work.outputs) if isinstance(work, Sequence) else []
        if isinstance(work, Sequence):
            work.hidden = None
        work.usage.generated_sentences = len(outputs)
        work.usage.total_time = time.perf_counter() - work.submitted
        if isinstance(work, Sequence):  # generation requests (SONAR jobs have their route's)
            if reason == "cancelled" and error is None:  # by its client, not by a shutdown
                self.metrics.cancelled.inc()
            self.metrics.finished.labels(reason).inc()
        self._outbox.append((work, FinalEvent(reason, outputs, work.usage, error, result)))

    def _sweep(self) -> None:
        """Finished items give back their KV pages and decoder rows."""
        if not self._gone:
            return
        gone, self._gone = self._gone, []
        ids = {id(w) for w in gone}
        self.runner.drop(
            {w for w in gone if isinstance(w, Sequence)},
            lambda key: id(_owner(key)) in ids,
        )


def _owner(key: Hashable) -> Work:
    """The work item a runner key belongs to (a sequence, or a `/decode` row's job)."""
    if isinstance(key, DecodeRow):
        return key.job
    assert isinstance(key, Work)
    return key


def long_prompt(prompt: str | list[str] | None) -> bool:
    """Whether splitting `prompt` is worth a thread hop (about 1 ms per 3 KB of text)."""
    return isinstance(prompt, str) and len(prompt) > 20_000


def _token_bound(text: str) -> int:
    """At most this many tokens: SentencePiece pieces cover at least one byte (byte fallback),
    plus the language token and `</s>`."""
    return len(text.encode("utf-8", errors="surrogatepass")) + 2
