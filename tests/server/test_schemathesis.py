"""Property-based API tests: schemathesis drives the live app (ASGI, tiny bundle) from its schema.

Every operation gets a bounded, deterministic set of generated requests (boundary values and
negative cases from the coverage phase, then `MAX_EXAMPLES` random ones). No response may be a
5xx, have an undocumented status or content type, or break its documented schema.

Event streams: the contract documents `text/event-stream` as `{"type": "string"}`; schemathesis
reads a 3.1 event-stream schema as the schema of *each event* (an object with `event`/`data`),
so it would reject every stream. Until the contract documents events, streams are checked here
against the wire models instead (framing, order, each payload); schemathesis's schema check
then applies to streams as soon as the schema describes events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest
import schemathesis
from api_helpers import settings, wait_until
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from pydantic import BaseModel, ValidationError
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from models.pipeline import SonarLLMPipeline
from server.api.app import create_app
from server.api.schemas import ErrorResponse, GenerateResponse, OpenAIUsage, SentenceOut

# Limits that keep every generated call cheap on the tiny bundle: two sentences at most, and a
# default deadline for whatever a generated `max_tokens`/`beam_size` costs (a generated `timeout`
# field replaces it; the sentence limit bounds those calls). SONAR_LLM_* variables play no part.
SETTINGS = settings(
    max_sentences_limit=2,
    request_timeout=10.0,
    max_running=8,
    max_waiting=32,
    keepalive_interval=0.5,
    shutdown_grace=0.0,
)
MAX_EXAMPLES = 20
READY_TIMEOUT = 60.0
BASE_URL = "http://testserver"
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        "request-timeout": 60,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    }
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# (operation, status, media type, error param/code) -> count; printed at the end with `-s`.
SEEN: Counter[tuple[str, int, str, str]] = Counter()


class Lifespan:
    """Runs an ASGI app's lifespan on its own event-loop thread: startup now, shutdown at exit.

    schemathesis can run lifespans itself, but it stops them after every test item, and this
    app's lifespan runs once per process (as under uvicorn): one app serves the whole module.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lifespan", daemon=True)
        self.inbox: asyncio.Queue[dict[str, Any]] | None = None
        self.outbox: asyncio.Queue[dict[str, Any]] | None = None
        self.task: concurrent.futures.Future[None] | None = None

    def _call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self) -> None:
        self.inbox, self.outbox = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        app: Any = self.app  # ASGI callables: the typing of scopes/messages differs by library
        self.task = asyncio.run_coroutine_threadsafe(
            app(scope, self.inbox.get, self.outbox.put), self.loop
        )

    async def _send(self, kind: str) -> dict[str, Any]:
        assert self.inbox is not None and self.outbox is not None
        await self.inbox.put({"type": f"lifespan.{kind}"})
        return await self.outbox.get()

    def __enter__(self) -> Lifespan:
        self.thread.start()
        self._call(self._open())
        reply = self._call(self._send("startup"))
        assert reply["type"] == "lifespan.startup.complete", reply
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            reply = self._call(self._send("shutdown"))
            assert reply["type"] == "lifespan.shutdown.complete", reply
            assert self.task is not None
            self.task.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def client(pipe: SonarLLMPipeline) -> Iterator[Any]:
    """A requests session into the live app (ASGI, in-process), once the app is ready."""
    app = create_app(SETTINGS, pipe=pipe)
    with Lifespan(app):
        state = app.state.sonar

        def ready() -> bool:
            assert state.status in ("ok", "loading", "warming"), f"not ready: {state.status}"
            return bool(state.status == "ok")

        wait_until(ready, READY_TIMEOUT, "the app to be ready")
        # Not entered as a context manager: entering would start a second lifespan.
        session = asgi.get_client(cast(Any, app))
        # A session's headers override a case's (schemathesis treats them as configured ones),
        # and requests' defaults include `Accept: */*`: keep only what each case sends.
        session.headers.clear()
        yield session


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    lines = [
        f"  {op} -> {status} {media} {code}".rstrip() + f": {n}"
        for (op, status, media, code), n in sorted(SEEN.items())
    ]
    print("\nresponses seen:\n" + "\n".join(lines))


# The schema comes from an app that is never started: the document is the one the live app
# serves, and building it needs no model.
schema = schemathesis.openapi.from_dict(create_app(SETTINGS).openapi(), config=CONFIG)


# ----- response checks ----------------------------------------------------------------------
def _media_type(response: schemathesis.Response) -> str:
    values = response.headers.get("content-type") or ["-"]
    return values[0].split(";")[0].strip()


def _error_code(response: schemathesis.Response) -> str:
    """The envelope's `param/code` of an error answer (what the summary groups errors by)."""
    if response.status_code < 400:
        return ""
    try:
        error = json.loads(response.content)["error"]
        return f"{error.get('param')}/{error.get('code')}"
    except (ValueError, KeyError, TypeError):
        return "?"


def _documents_events(case: schemathesis.Case, status: int) -> bool:
    """Whether the contract documents each SSE event as an object (then schemathesis checks)."""
    responses = case.operation.definition.raw.get("responses", {})
    documented = responses.get(str(status), {}).get("content", {}).get("text/event-stream", {})
    item = documented.get("itemSchema") or documented.get("schema") or {}
    return item.get("type") != "string"


def _events(body: str) -> list[tuple[str, str]]:
    """(event, data) of each SSE event; comments (`: ping`) skipped."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            out.append((name, "\n".join(data)))
    return out


def _parse(model: type[BaseModel], data: str, where: str) -> Any:
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise AssertionError(f"{where}: {data!r} is not a {model.__name__}: {e}") from None


def _check_native_stream(events: list[tuple[str, str]]) -> None:
    """`sentence` events, then exactly one `done` (GenerateResponse) or `error` (envelope)."""
    assert events, "empty event stream"
    *sentences, (last, data) = events
    for i, (name, payload) in enumerate(sentences):
        assert name == "sentence", f"event #{i} is {name!r}, expected 'sentence'"
        assert _parse(SentenceOut, payload, f"event #{i}").index == i, f"event #{i}: index"
    if last == "done":
        done = _parse(GenerateResponse, data, "done event")
        assert len(done.sentences) == len(sentences), "done.sentences != the streamed sentences"
    else:
        assert last == "error", f"the stream ends with {last!r}, expected 'done' or 'error'"
        _parse(ErrorResponse, data, "error event")


CHUNK_KEYS = {"id", "object", "created", "model", "choices"}


def _check_openai_stream(events: list[tuple[str, str]], chat: bool) -> None:
    """`data: {chunk}` events, the last with a finish_reason, then `data: [DONE]`."""
    assert events and events[-1] == ("message", "[DONE]"), f"no final [DONE]: {events[-1:]}"
    chunks = events[:-1]
    assert chunks, "no chunk before [DONE]"
    obj = "chat.completion.chunk" if chat else "text_completion"
    for i, (name, data) in enumerate(chunks):
        assert name == "message", f"chunk #{i} has event {name!r}"
        chunk = json.loads(data)
        if "error" in chunk:
            _parse(ErrorResponse, data, f"chunk #{i}")
            assert i == len(chunks) - 1, "an error must be the last chunk before [DONE]"
            return
        assert chunk.keys() >= CHUNK_KEYS and chunk["object"] == obj, f"chunk #{i}: {chunk}"
        if not chunk["choices"]:  # include_usage: the last chunk carries the usage alone
            assert i == len(chunks) - 1 and chunk.get("usage"), f"chunk #{i}: {chunk}"
            _parse(OpenAIUsage, json.dumps(chunk["usage"]), f"chunk #{i} usage")
            return
        (choice,) = chunk["choices"]
        usage_last = bool(chunks) and not json.loads(chunks[-1][1]).get("choices", [1])
        last = i == len(chunks) - 1 - int(usage_last)
        assert (choice["finish_reason"] is not None) == last, f"chunk #{i}: {choice}"
        assert ("delta" in choice) if chat else isinstance(choice.get("text"), str), choice
        # With include_usage every other chunk says `"usage": null`, as OpenAI's do.
        assert chunk.get("usage") is None, f"chunk #{i}: usage before the last chunk"


def _validate(case: schemathesis.Case, response: schemathesis.Response) -> None:
    media = _media_type(response)
    SEEN[(case.operation.label, response.status_code, media, _error_code(response))] += 1
    streamed = media == "text/event-stream"
    checks = CHECKS
    if streamed and not _documents_events(case, response.status_code):
        checks = [c for c in CHECKS if c is not response_schema_conformance]
    case.validate_response(response, checks=checks)
    if streamed and response.status_code == 200:
        events = _events(response.content.decode("utf-8"))
        path = case.operation.path
        if path.startswith("/v1/"):
            _check_openai_stream(events, chat=path.endswith("/chat/completions"))
        else:
            _check_native_stream(events)


# ----- tests --------------------------------------------------------------------------------
@schema.parametrize()
@hypothesis_settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_generated_requests_conform(case: schemathesis.Case, client: Any) -> None:
    _validate(case, case.call(base_url=BASE_URL, session=client))


# Requests the random ones rarely produce (a usable prompt *and* a stream), through the same
# checks: each generation route, answered as JSON and as a stream.
SHORT: dict[str, Any] = {"max_sentences": 2, "max_tokens": 24, "beam_size": 2}
KNOWN_GOOD: dict[str, dict[str, Any]] = {
    "/generate": {"prompt": "The cat runs home. It is late.", **SHORT},
    "/summarize": {"document": "The cat runs home. It is late. The moon is up.", **SHORT},
    "/v1/completions": {"prompt": "The cat runs home.", **SHORT},
    "/v1/chat/completions": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Where is the cat?"}]},
        ],
        **SHORT,
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("path", list(KNOWN_GOOD))
def test_known_good_requests_conform(path: str, stream: bool, client: Any) -> None:
    body = {**KNOWN_GOOD[path], "stream": stream}
    if stream and path == "/v1/completions":
        body["stream_options"] = {"include_usage": True}  # allowed only with a stream
    case = schema[path]["POST"].Case(body=body)
    response = case.call(base_url=BASE_URL, session=client)
    assert response.status_code == 200, response.content
    assert _media_type(response) == ("text/event-stream" if stream else "application/json")
    _validate(case, response)


def test_accept_header_selects_a_stream(client: Any) -> None:
    case = schema["/generate"]["POST"].Case(
        body=KNOWN_GOOD["/generate"], headers={"Accept": "text/event-stream"}
    )
    response = case.call(base_url=BASE_URL, session=client)
    assert _media_type(response) == "text/event-stream"
    _validate(case, response)
