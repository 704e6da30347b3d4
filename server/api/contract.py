"""What the generated OpenAPI document cannot say by itself: the events of each stream, and the
API-key security scheme.

Event streams are documented as OpenAPI 3.1 describes them: the schema of one event, an object
with `event` and `data`, where `data` holds JSON (`contentMediaType`) of a named component.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from server.api.schemas import (
    ChatCompletionChunk,
    CompletionChunk,
    ErrorResponse,
    GenerateResponse,
    SentenceOut,
)

REF = "#/components/schemas/{model}"


def _json_data(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": REF.format(model=model.__name__)},
    }


def _event(name: str, model: type[BaseModel], description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"event": {"const": name}, "data": _json_data(model, description)},
        "required": ["event", "data"],
    }


NATIVE_EVENTS: dict[str, Any] = {
    "oneOf": [
        _event("sentence", SentenceOut, "each sentence as soon as it is decoded"),
        _event("done", GenerateResponse, "last: the whole answer"),
        _event("error", ErrorResponse, "last, instead of done: a failure after the start"),
    ],
    "description": "`event: sentence` for each sentence, then `event: done` (or `event: "
    "error`); `: ping` comments keep an idle connection open.",
}


def _openai_events(chunk: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "data": {
                "description": f"a {chunk.__name__} (or, after a failure, an ErrorResponse), "
                "then the literal `[DONE]`",
                "anyOf": [
                    {"const": "[DONE]"},
                    _json_data(chunk, "one chunk"),
                ],
            }
        },
        "required": ["data"],
    }


STREAMS = {
    "/generate": NATIVE_EVENTS,
    "/summarize": NATIVE_EVENTS,
    "/v1/completions": _openai_events(CompletionChunk),
    "/v1/chat/completions": _openai_events(ChatCompletionChunk),
}


def add_event_schemas(schema: dict[str, Any]) -> None:
    """Type every documented event stream, and publish the models its events carry."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (SentenceOut, CompletionChunk, ChatCompletionChunk, GenerateResponse):
        defs = model.model_json_schema(ref_template=REF.replace("{model}", "{model}"))
        for name, sub in defs.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, defs)
    for path, events in STREAMS.items():
        ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is not None:
            ok.setdefault("content", {})["text/event-stream"] = {"schema": copy.deepcopy(events)}


def add_security(schema: dict[str, Any], open_paths: tuple[str, ...]) -> None:
    """Bearer or X-API-Key on every route but the open ones; needed only when the server is
    started with `--api-key` (then a missing or wrong key is a 401)."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["bearerAuth"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key from --api-key / SONAR_LLM_API_KEY",
    }
    schemes["apiKeyHeader"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(open_paths):
            continue
        for operation in operations.values():
            # {}: no key at all, for servers started without --api-key.
            operation["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {}]
