"""The engine's settings: the scheduler's, plus what the engine and its input processor own.

Tensor-free, so the server's settings read their defaults from here without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig(SchedulerConfig):
    """The scheduler's settings plus what the engine itself owns."""

    # Bytes for the SONAR-LLM KV cache and the decoder's cache together; None: a share of the
    # memory that is free once the model is loaded (see `server.engine.memory`).
    cache_memory: int | None = None
    encoder_cache_size: int = 10_000
    # The largest prompt, in context positions ("Begin of text.", sentences, given vectors).
    max_prompt_sentences: int = 2048
    # CPython's GIL switch interval while the engine runs (see `Engine.start`); None: leave it.
    gil_switch_interval: float | None = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_memory is not None and self.cache_memory < 1:
            raise ValueError("cache_memory must be a positive number of bytes")
        if self.max_prompt_sentences < 1:
            raise ValueError("max_prompt_sentences must be >= 1")
        if self.gil_switch_interval is not None and not self.gil_switch_interval > 0:
            raise ValueError("gil_switch_interval must be > 0 seconds (or None)")
