"""The scheduling loop: continuous batching at token level for the SONAR decoder, at sentence
level for the SONAR-LLM.

One thread owns the model, the codec and every request's state; the asyncio side only submits,
reads events and cancels. Each iteration:

1. drop cancelled and timed-out requests (their KV rows and decoder rows go with them);
2. admit waiting requests within `max_running` and a prefill budget: their prompt sentences are
   encoded in one batch (through the encoder cache) and prefilled in one batched call; their
   first predicted embeddings join the decoder batch;
3. advance every request's sentence by one token in one batched beam-search step
   (`models.beam_search.DecodeBatch`), whatever position each request's sentence is at;
4. for the requests whose sentence ended: re-encode the texts in one call, check EOS and length,
   emit sentences, take one batched model step for those that continue and start their next
   sentences in the decoder batch.
A short sentence therefore never waits for a long one beside it. Sampled sentences (and every
sentence when the decoder is not the SONAR architecture) are decoded whole through fairseq2 in the
iteration they start. A failure inside a batched call is retried row by row where it can be, so
only the request at fault ends with `error`; a failure of the loop itself fails every request and
marks the engine dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry

from models.beam_search import BeamRequest, DecodeBatch
from models.generate import (
    FinishReason,
    GenerationError,
    add_latent_noise,
    eos_similarity,
    prompt_sentences,
)
from models.kv_cache import KVCache
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded
from models.sonar_llm import SonarLLM
from server.engine.encoder_cache import EncoderCache
from server.engine.metrics import EngineMetrics
from server.engine.request import (
    Event,
    FinalEvent,
    GenerationRequest,
    SentenceEvent,
    Sequence,
    Status,
)

log = logging.getLogger("sonar_llm.engine")
T = TypeVar("T")


class EngineOverloaded(RuntimeError):
    """The queue is full: the HTTP layer answers 503 with Retry-After."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(f"server overloaded: {reason}")
        self.reason = reason
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The scheduling loop is not running (stopped, or crashed)."""


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 32  # requests stepped together
    max_waiting: int = 128  # requests queued beyond that
    max_prefill_sentences: int = 512  # prompt sentences prefilled per iteration
    encoder_cache_size: int = 10_000
    # After an iteration that finished requests, wait this long for the follow-ups their clients
    # submit (closed-loop clients, chat turns). Requests join the decoder at any token step, so
    # missing an iteration costs one token step, and the default is not to wait.
    admission_window: float = 0.0
    # Sentences that ended wait (still streamed only once complete) until this fraction of the
    # running requests has one, or the decoder has nothing else to do, or `completion_max_wait`
    # token steps have passed: one re-encode and one model step then serve them all. Both calls
    # cost about the same for 1 row as for 16 (they read all the weights), so they are batched.
    completion_fraction: float = 0.5
    completion_max_wait: int = 16
    # CPython's GIL switch interval while the engine runs (see `Engine.start`); None: leave it.
    gil_switch_interval: float | None = 0.001

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_waiting < 0 or self.max_prefill_sentences < 1:
            raise ValueError("max_running and max_prefill_sentences >= 1, max_waiting >= 0")
        if not 0 <= self.completion_fraction <= 1 or self.completion_max_wait < 0:
            raise ValueError("completion_fraction in [0, 1], completion_max_wait >= 0")
        if self.gil_switch_interval is not None and not self.gil_switch_interval > 0:
            raise ValueError("gil_switch_interval must be > 0 seconds (or None)")


@dataclass
class _Batch:
    """The running requests, in KV-cache row order."""

    seqs: list[Sequence] = field(default_factory=list)
    cache: KVCache | None = None

    def keep(self, keep: list[int]) -> None:
        if keep == list(range(len(self.seqs))):
            return  # nobody left: no copy of the cache
        self.seqs = [self.seqs[i] for i in keep]
        if self.cache is not None:
            self.cache = self.cache.select(keep) if keep else None

    def add(self, seqs: list[Sequence], cache: KVCache) -> None:
        self.seqs.extend(seqs)
        self.cache = cache if self.cache is None else KVCache.concat([self.cache, cache])

    def step(self, model: SonarLLM, seqs: list[Sequence], embeddings: torch.Tensor) -> torch.Tensor:
        """One model step for `seqs` (some of the running requests) on their own KV rows."""
        assert self.cache is not None
        if seqs == self.seqs:
            return model.step(self.cache, embeddings)
        where = {id(s): i for i, s in enumerate(self.seqs)}
        rows = [where[id(s)] for s in seqs]
        sub = self.cache.select(rows)
        hidden = model.step(sub, embeddings)
        self.cache.assign(rows, sub)
        return hidden


class EventStream:
    """One request's events: iterate, or `next(timeout)`; `aclose()` before the end cancels."""

    def __init__(self, engine: Engine, seq: Sequence, queue: asyncio.Queue[Event]) -> None:
        self._engine = engine
        self._seq = seq
        self._queue = queue
        self._done = False

    @property
    def request_id(self) -> str:
        return self._seq.request.request_id

    @property
    def prompt_sentences(self) -> int:
        return len(self._seq.sentences)

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

    def _take(self, event: Event) -> Event:
        if isinstance(event, FinalEvent):
            self._done = True
        return event

    async def aclose(self) -> None:
        """Cancel the request unless it already finished."""
        if not self._done:
            self._done = True
            self._engine.cancel(self._seq)

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
        self.encoder_cache = EncoderCache(pipe.codec, self.config.encoder_cache_size)
        self._waiting: deque[Sequence] = deque()
        self._batch = _Batch()
        # The SONAR decoder's token-level batch (None: the decoder runs through fairseq2), and
        # the sentences that ended this iteration, awaiting re-encoding.
        self._decoder: DecodeBatch | None = (
            pipe.codec.new_batch() if pipe.codec.decoder_stack is not None else None
        )
        self._ready: list[tuple[Sequence, Decoded]] = []
        self._ready_since: int | None = None  # iteration the oldest of `_ready` ended in
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.iterations = 0
        self._finished_last_iteration = 0
        # Events wait here until the iteration's state (batch, gauges) is updated, so a client
        # that sees its final event also sees itself gone from the running count.
        self._outbox: list[tuple[Sequence, Event]] = []

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
        """Stop the loop; requests still queued or running end with `cancelled`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def num_running(self) -> int:
        return len(self._batch.seqs)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def kv_cache_bytes(self) -> int:
        cache = self._batch.cache
        return 0 if cache is None else cache.used_bytes()

    # ----- asyncio face --------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> EventStream:
        """Queue `request`; its events come from the returned stream, whose `aclose()` cancels.

        Raises GenerationError for bad fields and EngineOverloaded when the queue is full,
        both before anything is queued.
        """
        seq = self._prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            # A RuntimeError means the client's event loop is gone: nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

        seq.emit = emit
        self._enqueue(seq)
        return EventStream(self, seq, queue)

    def cancel(self, seq: Sequence, reason: FinishReason = "cancelled") -> None:
        """Ask the loop to end `seq` before its next iteration."""
        with self._cond:
            if seq.cancel_reason is None and seq.status is not Status.FINISHED:
                seq.cancel_reason = reason
            self._cond.notify_all()

    async def run_job(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between iterations (SONAR as a service, warm-up)."""
        if not self.alive:
            raise EngineDead("engine is not running")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((fn, fut))
            self._cond.notify_all()
        return await asyncio.wrap_future(fut)

    # ----- submission (caller's thread) ----------------------------------------------------
    def _prepare(self, request: GenerationRequest) -> Sequence:
        opts = request.options
        self.pipe.check_options(opts)
        if request.timeout is not None and not request.timeout > 0:
            raise GenerationError("timeout", f"must be > 0 seconds, got {request.timeout}")
        add_begin = self.pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
        sentences = prompt_sentences(request.prompt, opts.source_lang, add_begin)
        return Sequence(request=request, sentences=sentences, add_begin=add_begin, emit=_drop)

    def _enqueue(self, seq: Sequence) -> None:
        with self._cond:
            if not self.alive or self._stopping:
                raise EngineDead("engine is not running")
            free_slots = self.config.max_running - len(self._batch.seqs)
            if len(self._waiting) >= self.config.max_waiting + max(free_slots, 0):
                self.metrics.rejected.labels("queue_full").inc()
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests waiting (max_waiting "
                    f"{self.config.max_waiting})",
                    retry_after=1.0,
                )
            self._waiting.append(seq)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify_all()

    # ----- the loop (engine thread) --------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._batch.seqs or self._jobs):
                        self._cond.wait()
                    if self._stopping:
                        break
                    if (
                        self.config.admission_window > 0
                        and self._finished_last_iteration
                        and not self._waiting
                        and len(self._batch.seqs) < self.config.max_running
                    ):
                        self._cond.wait_for(
                            lambda: bool(self._waiting) or self._stopping,
                            timeout=self.config.admission_window,
                        )
                    jobs = list(self._jobs)
                    self._jobs.clear()
                for fn, fut in jobs:
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:
                            fut.set_exception(e)
                self.step()
        except BaseException as e:  # the loop must never die silently
            log.exception("engine loop crashed")
            self.error = e
        finally:
            reason: FinishReason = "error" if self.error else "cancelled"
            message = f"engine stopped: {self.error}" if self.error else "server shutting down"
            with self._cond:
                pending = list(self._waiting) + self._batch.seqs
                self._waiting.clear()
                jobs = list(self._jobs)
                self._jobs.clear()
            for seq in pending:
                self._finish(seq, reason, message)
            self._batch = _Batch()
            self._ready = []
            self._ready_since = None
            if self._decoder is not None:
                self._decoder = self.pipe.codec.new_batch()
            for _, fut in jobs:
                fut.cancel()
            self._update_gauges()
            self._flush()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: drop ended requests; admit and prefill; one decoder token for every
        running request; finish the sentences that ended (re-encode, checks, model step)."""
        t0 = time.perf_counter()
        self._drop_ended(t0)
        self._admit()
        if self._batch.seqs:
            self.metrics.batch_size.observe(len(self._batch.seqs))
            self._decode_step()
            self._complete_sentences()
            self._sweep()
            self.metrics.iteration_seconds.observe(time.perf_counter() - t0)
        self.iterations += 1
        self._update_gauges()
        self._flush()

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        self._finished_last_iteration = sum(isinstance(e, FinalEvent) for _, e in outbox)
        for seq, event in outbox:
            try:
                seq.emit(event)
            except Exception:  # a broken listener must not take the loop down
                log.exception("could not deliver an event to request %s", seq.request.request_id)

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._batch.seqs))
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.kv_cache_bytes.set(self.kv_cache_bytes())
        decoder = self._decoder
        self.metrics.decoder_rows.set(decoder.num_rows if decoder is not None else 0)
        self.metrics.decoder_cache_bytes.set(decoder.cache_bytes() if decoder is not None else 0)

    def _drop_ended(self, now: float) -> None:
        for seq in list(self._waiting):
            if seq.expired(now) and seq.cancel_reason is None:
                seq.cancel_reason = "timeout"
        with self._cond:
            dropped = [s for s in self._waiting if s.cancel_reason]
            for seq in dropped:
                self._waiting.remove(seq)
        for seq in self._batch.seqs:
            if seq.cancel_reason is None and seq.expired(now):
                seq.cancel_reason = "timeout"
            if seq.cancel_reason:
                dropped.append(seq)
        for seq in dropped:
            assert seq.cancel_reason is not None
            self._finish(seq, seq.cancel_reason)
        if dropped:
            self._sweep()  # their KV rows and decoder rows go now

    def _admit(self) -> None:
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_sentences
        with self._cond:
            while self._waiting and len(self._batch.seqs) + len(admitted) < self.config.max_running:
                n = len(self._waiting[0].sentences)
                if admitted and n > budget:
                    break  # long prompts wait for the next iteration; running ones keep going
                admitted.append(self._waiting.popleft())
                budget -= n
        if not admitted:
            return
        now = time.perf_counter()
        for seq in admitted:
            seq.status = Status.RUNNING
            seq.started = now
            seq.usage.queue_time = now - seq.submitted
            seq.usage.prompt_sentences = len(seq.sentences)
            seq.latent_rng = seq.options.latent_generator(self.pipe.model.device)
            self.metrics.queue_time.observe(seq.usage.queue_time)
            self.metrics.prompt_sentences.inc(len(seq.sentences))
        ok = self._guarded(admitted, self._prefill, "prefill")
        if ok:
            hidden, cache = ok
            for seq, h in zip(admitted, hidden, strict=True):
                seq.hidden = h
            self._batch.add(admitted, cache)
            self._start_decoding(admitted)

    def _prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, KVCache]:
        texts: list[str] = []
        langs: list[str] = []
        for seq in seqs:
            for j, s in enumerate(seq.sentences):
                texts.append(s)
                # "Begin of text." is English whatever the prompt's language (see the pipeline).
                langs.append("eng_Latn" if seq.add_begin and j == 0 else seq.options.source_lang)
        embeddings = self._encode(texts, langs)
        contexts, start = [], 0
        for seq in seqs:
            contexts.append(embeddings[start : start + len(seq.sentences)])
            start += len(seq.sentences)
        return self.pipe.model.prefill(contexts)

    def _encode(self, texts: list[str], langs: list[str]) -> torch.Tensor:
        hits, misses = self.encoder_cache.hits, self.encoder_cache.misses
        out = self.encoder_cache.encode(texts, langs)
        self.metrics.encoder_cache_hits.inc(self.encoder_cache.hits - hits)
        self.metrics.encoder_cache_misses.inc(self.encoder_cache.misses - misses)
        return out

    # ----- decoding at token level ---------------------------------------------------------
    def _start_decoding(self, seqs: list[Sequence]) -> None:
        """Project each request's hidden state and start decoding its next sentence.

        Beam-search rows join the persistent decode batch (they advance one token per
        iteration); sampled rows, and every row when the decoder runs through fairseq2, are
        decoded at once and complete in this iteration.
        """
        if not seqs:
            return
        hidden = torch.stack(
            [
                add_latent_noise(s.hidden, s.options.latent_temperature, s.latent_rng)
                for s in seqs
                if s.hidden is not None
            ]
        )
        assert hidden.shape[0] == len(seqs), (
            "every request starting a sentence holds a hidden state"
        )
        for s in seqs:
            s.hidden = None
        predicted = self.pipe.model.project(hidden)
        codec = self.pipe.codec
        now_rows: list[int] = []
        requests: list[BeamRequest] = []
        for i, seq in enumerate(seqs):
            opts = seq.options.decode_for(len(seq.outputs))
            if self._decoder is None or opts.sampling:
                now_rows.append(i)
                continue
            try:
                req = codec.beam_request(seq, predicted[i], seq.options.target_lang, opts)
                self._decoder.check(req)
            except Exception as e:
                log.exception("decode failed for request %s", seq.request.request_id)
                self._finish(seq, "error", f"decode failed: {e}")
                continue
            requests.append(req)
        if requests:
            assert self._decoder is not None
            try:
                self._decoder.add(requests)
            except Exception as e:
                log.exception("could not start decoding %d requests", len(requests))
                for r in requests:
                    self._finish(r.key, "error", f"decode failed: {e}")  # type: ignore[arg-type]
        if now_rows:
            decoded = self._per_row(
                seqs,
                lambda rows: codec.decode(
                    predicted[rows],
                    [seqs[i].options.target_lang for i in rows],
                    [seqs[i].options.decode_for(len(seqs[i].outputs)) for i in rows],
                ),
                "decode",
                rows=now_rows,
            )
            self._ready.extend((seqs[i], decoded[i]) for i in now_rows if decoded[i] is not None)

    def _decode_step(self) -> None:
        """One token for every beam row; sentences that ended join `_ready`."""
        decoder = self._decoder
        if decoder is None or not len(decoder):
            return
        try:
            result = decoder.step()
        except Exception as e:
            # The batch's state is unusable: every request in it ends, the others go on.
            log.exception("decoder step failed for %d requests", len(decoder))
            for seq in decoder.members():
                self._finish(seq, "error", f"decode failed: {e}")  # type: ignore[arg-type]
            self._decoder = self.pipe.codec.new_batch()
            return
        for seq, why in result.failed:
            self._finish(seq, "error", f"decode failed: {why}")  # type: ignore[arg-type]
        codec = self.pipe.codec
        for seq, out in result.finished:
            self._ready.append((seq, codec.to_decoded(out)))  # type: ignore[arg-type]

    def _completion_due(self) -> bool:
        """Whether to complete the sentences that ended now (see `completion_fraction`)."""
        self._ready = [(s, d) for s, d in self._ready if s.status is not Status.FINISHED]
        if not self._ready:
            return False
        decoding = len(self._decoder) if self._decoder is not None else 0
        if decoding == 0 or self._waiting:
            return True
        if len(self._ready) >= self.config.completion_fraction * len(self._batch.seqs):
            return True
        return self._ready_since is not None and (
            self.iterations - self._ready_since >= self.config.completion_max_wait
        )

    def _complete_sentences(self) -> None:
        """For every sentence that ended: re-encode, EOS and length checks, emit, and one batched
        model step for the requests that go on, which then start their next sentence."""
        if self._ready and self._ready_since is None:
            self._ready_since = self.iterations
        if not self._completion_due():
            return
        ready, self._ready = self._ready, []
        self._ready_since = None
        seqs = [s for s, _ in ready]
        reencoded = self._per_row(
            seqs,
            lambda rows: list(
                self._encode(
                    [ready[i][1].text for i in rows],
                    [seqs[i].options.target_lang for i in rows],
                )
            ),
            "re-encode",
        )
        done = [i for i in range(len(seqs)) if reencoded[i] is not None]
        # One similarity computation (one device sync) for all of them.
        sims = (
            eos_similarity(
                torch.stack([reencoded[i] for i in done]),
                torch.stack([self.pipe.eos_embedding(seqs[i].options.eos_text) for i in done]),
            ).tolist()
            if done
            else []
        )
        now = time.perf_counter()
        going_on: list[int] = []
        for i, sim in zip(done, sims, strict=True):
            seq, d, emb = seqs[i], ready[i][1], reencoded[i]
            self._account(seq, d)
            if sim >= seq.options.eos_threshold:
                self._finish(seq, "stop")
                continue
            self._emit_sentence(seq, d, emb, now)
            if len(seq.outputs) >= seq.options.max_sentences:
                self._finish(seq, "length")
            else:
                going_on.append(i)
        self._sweep()
        if not going_on:
            return
        stepping = [seqs[i] for i in going_on]
        step_in = torch.stack([reencoded[i] for i in going_on])
        new_hidden = self._guarded(
            stepping, lambda _: self._batch.step(self.pipe.model, stepping, step_in), "step"
        )
        if new_hidden is None:
            self._sweep()
            return
        for seq, h in zip(stepping, new_hidden, strict=True):
            seq.hidden = h
        self._start_decoding(stepping)

    def _sweep(self) -> None:
        """Finished requests leave the running batch (their KV rows) and the decoder."""
        keep = [i for i, s in enumerate(self._batch.seqs) if s.status is not Status.FINISHED]
        self._batch.keep(keep)
        if self._decoder is not None and len(self._decoder):
            gone = {k for k in self._decoder.members() if k.status is Status.FINISHED}  # type: ignore[attr-defined]
            if gone:
                self._decoder.remove(gone)

    def _account(self, seq: Sequence, d: Decoded) -> None:
        seq.usage.decoded_tokens += d.num_tokens
        self.metrics.decoded_tokens.inc(d.num_tokens)

    def _emit_sentence(self, seq: Sequence, d: Decoded, emb: torch.Tensor, now: float) -> None:
        if seq.usage.time_to_first_sentence is None:
            seq.usage.time_to_first_sentence = now - seq.submitted
            self.metrics.time_to_first_sentence.observe(seq.usage.time_to_first_sentence)
        elif seq.last_emit is not None:
            self.metrics.inter_sentence_latency.observe(now - seq.last_emit)
        seq.last_emit = now
        embedding = emb.float().cpu().tolist() if seq.request.return_embeddings else None
        self._outbox.append(
            (
                seq,
                SentenceEvent(
                    index=len(seq.outputs),
                    text=d.text,
                    num_tokens=d.num_tokens,
                    embedding=embedding,
                    elapsed=now - seq.submitted,
                ),
            )
        )
        seq.outputs.append(d.text)
        self.metrics.sentences.inc()

    # ----- failure isolation ---------------------------------------------------------------
    def _per_row(
        self,
        seqs: list[Sequence],
        fn: Callable[[list[int]], list[Any]],
        what: str,
        rows: list[int] | None = None,
    ) -> list[Any]:
        """fn(rows) batched; on failure, row by row so only the failing requests end."""
        rows = list(range(len(seqs))) if rows is None else rows
        out: list[Any] = [None] * len(seqs)
        if not rows:
            return out
        try:
            for i, r in zip(rows, fn(rows), strict=True):
                out[i] = r
            return out
        except Exception:
            log.warning("batched %s failed; isolating the failing request", what, exc_info=True)
        for i in rows:
            try:
                out[i] = fn([i])[0]
            except Exception as e:
                log.exception("%s failed for request %s", what, seqs[i].request.request_id)
                self._finish(seqs[i], "error", f"{what} failed: {e}")
        return out

    def _guarded(
        self, seqs: list[Sequence], fn: Callable[[list[Sequence]], T], what: str
    ) -> T | None:
        """fn(seqs); on failure every request in `seqs` ends with error (state is unusable)."""
        try:
            return fn(seqs)
        except Exception as e:
            log.exception("%s failed for %d requests", what, len(seqs))
            for seq in seqs:
                self._finish(seq, "error", f"{what} failed: {e}")
            return None

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        if seq.status is Status.FINISHED:
            return
        seq.status = Status.FINISHED
        seq.hidden = None
        seq.usage.generated_sentences = len(seq.outputs)
        seq.usage.total_time = time.perf_counter() - seq.submitted
        if reason == "cancelled" and error is None:  # by its client, not by a shutdown
            self.metrics.cancelled.inc()
        self.metrics.finished.labels(reason).inc()
        self._outbox.append((seq, FinalEvent(reason, list(seq.outputs), seq.usage, error)))


def _drop(_: Event) -> None:
    pass
