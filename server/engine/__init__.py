"""The serving runtime: continuous batching of sentence-level generation across requests."""

from server.engine.engine import Engine, EngineConfig, EngineDead, EngineOverloaded, EventStream
from server.engine.request import FinalEvent, GenerationRequest, SentenceEvent

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineDead",
    "EngineOverloaded",
    "EventStream",
    "FinalEvent",
    "GenerationRequest",
    "SentenceEvent",
]
