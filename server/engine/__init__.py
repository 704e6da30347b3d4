"""The serving runtime: continuous batching across requests (sentences for the SONAR-LLM, tokens
for the SONAR decoder)."""

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
