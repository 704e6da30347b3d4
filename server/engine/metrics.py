"""Prometheus instruments the engine updates (the HTTP layer exports the same registry)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from server.engine.runner import Runner
    from server.engine.scheduler import Scheduler

# Iterations (one decoder token) take milliseconds, sentences tens of milliseconds to seconds,
# requests up to minutes.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sonar_llm_{name}", doc, registry=registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"sonar_llm_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sonar_llm_{name}", doc, buckets=buckets, registry=registry)

        self.running = gauge("num_requests_running", "Requests in the running batch")
        self.waiting = gauge("num_requests_waiting", "Requests queued for admission")
        self.cache_bytes = Gauge(
            "sonar_llm_cache_bytes",
            "Cache memory by cache (llm: the SONAR-LLM KV cache, decoder: the SONAR decoder's "
            "self-attention cache) and state (allocated: pages held; used: positions filled)",
            ("cache", "state"),
            registry=registry,
        )
        self.cache_limit = gauge(
            "cache_memory_limit_bytes", "The cache memory budget both caches share"
        )
        self.cache_reserved = gauge(
            "cache_reserved_bytes",
            "Cache memory promised to running work at its worst case (admission control)",
        )
        self.cache_usage = gauge(
            "cache_usage_ratio", "Allocated share of the cache memory budget (0 to 1)"
        )
        self.decoder_rows = gauge(
            "decoder_rows", "Beam hypotheses in the SONAR decoder's token-level batch"
        )
        self.batch_size = histogram(
            "batch_size", "Sentences in the decoder per iteration", BATCH_BUCKETS
        )
        self.queue_time = histogram(
            "queue_time_seconds", "Submission to admission", LATENCY_BUCKETS
        )
        self.time_to_first_sentence = histogram(
            "time_to_first_sentence_seconds", "Submission to first sentence", LATENCY_BUCKETS
        )
        self.inter_sentence_latency = histogram(
            "inter_sentence_latency_seconds", "Between consecutive sentences", LATENCY_BUCKETS
        )
        self.iteration_seconds = histogram(
            "iteration_duration_seconds",
            "One scheduler iteration (one decoder token for every running request)",
            LATENCY_BUCKETS,
        )
        self.sentences = counter("sentences_generated", "Sentences sent to clients")
        self.prompt_sentences = counter("prompt_sentences", "Prompt sentences admitted")
        self.decoded_tokens = counter("decoded_tokens", "Tokens produced by the SONAR decoder")
        self.encoder_cache_hits = counter("encoder_cache_hits", "Encoder cache hits")
        self.encoder_cache_misses = counter("encoder_cache_misses", "Encoder cache misses")
        self.rejected = counter(
            "rejected", "Requests rejected at submission (queue_full, too_large)", ("reason",)
        )
        self.cancelled = counter("cancelled", "Generation requests cancelled by their client")
        self.repetition_stops = counter(
            "repetition_stops",
            "Generations ended by the repetition stop (a sentence repeated an earlier one)",
        )
        self.finished = counter(
            "requests_finished", "Finished generation requests", ("finish_reason",)
        )

    def update(self, scheduler: Scheduler[Any], runner: Runner) -> None:
        """The gauges, after an iteration (host-side numbers: no device sync)."""
        self.running.set(scheduler.num_running)
        self.waiting.set(scheduler.num_waiting)
        blocks = scheduler.blocks
        for kind in ("allocated", "used"):
            for cache, n in runner.cache_bytes(kind).items():
                self.cache_bytes.labels(cache, kind).set(n)
        self.cache_reserved.set(blocks.reserved * blocks.page_bytes)
        self.cache_usage.set(blocks.used_pages / blocks.num_pages)
        self.decoder_rows.set(runner.decoder.num_rows)
