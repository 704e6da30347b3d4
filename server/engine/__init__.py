"""The serving runtime: continuous batching across requests (sentences for the SONAR-LLM, tokens
for the SONAR decoder).

Names are imported on first use, so the tensor-free scheduler imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.llm import LLM, Output
    from server.engine.request import (
        DecodeRequest,
        EmbedRequest,
        EngineDead,
        EngineOverloaded,
        FinalEvent,
        GenerationRequest,
        SentenceEvent,
    )
    from server.engine.stream import EventStream

_WHERE = {
    "Engine": "server.engine.engine",
    "EngineConfig": "server.engine.config",
    "EngineDead": "server.engine.request",
    "EngineOverloaded": "server.engine.request",
    "EventStream": "server.engine.stream",
    "DecodeRequest": "server.engine.request",
    "EmbedRequest": "server.engine.request",
    "FinalEvent": "server.engine.request",
    "GenerationRequest": "server.engine.request",
    "SentenceEvent": "server.engine.request",
    "LLM": "server.engine.llm",
    "Output": "server.engine.llm",
}
__all__ = [
    "LLM",
    "DecodeRequest",
    "EmbedRequest",
    "Engine",
    "EngineConfig",
    "EngineDead",
    "EngineOverloaded",
    "EventStream",
    "FinalEvent",
    "GenerationRequest",
    "Output",
    "SentenceEvent",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
