"""ASGI middleware: request ids and HTTP metrics, body size limit, JSON-only bodies, API keys,
and a browser's `GET /` sent to the playground.

Written as plain ASGI (not BaseHTTPMiddleware) so streaming responses pass through untouched
and a client's disconnect still reaches the route.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.api.errors import APIError
from server.api.state import AppState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PLAYGROUND = "/playground/"
# Never behind the API key: probes, metrics, and the playground's static files (the page asks
# for the key and sends it with its API calls).
OPEN_PATHS = ("/health/", "/metrics", PLAYGROUND.rstrip("/"))


async def _send_error(send: Send, error: APIError, request_id: str | None = None) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (error.headers or {}).items():
        headers.append((k.lower().encode(), v.encode()))
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class RequestContext:
    """X-Request-Id in and out (and X-Replica-Id under Ray Serve), and requests_total /
    request_duration per route template."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *[(k, v) for k, v in message["headers"] if k.lower() != b"x-request-id"],
                    (b"x-request-id", rid.encode()),
                ]
                if self.state.replica_id is not None:  # behind Ray Serve: who answered
                    message["headers"].append((b"x-replica-id", self.state.replica_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            m = self.state.http_metrics
            m.requests.labels(route, str(status)).inc()
            m.duration.labels(route).observe(time.perf_counter() - start)
            request_id_var.reset(token)


class BodyGuard:
    """413 for bodies over the limit, 415 for non-JSON bodies; the body is read once here."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.limit = state.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        rid = scope.get("state", {}).get("request_id")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, _too_large(self.limit), rid)
            return
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if ctype and ctype != "application/json" and not ctype.endswith("+json"):
            await _send_error(
                send,
                APIError(
                    415,
                    f"Content-Type must be application/json, got {ctype}",
                    param="content-type",
                    code="unsupported_media_type",
                ),
                rid,
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await _send_error(send, _too_large(self.limit), rid)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body and not ctype:
            # Without a content type FastAPI would not parse the body and answer a confusing 400.
            error = APIError(
                415,
                "Content-Type: application/json is required for a request body",
                param="content-type",
                code="unsupported_media_type",
            )
            await _send_error(send, error, rid)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to go away

        await self.app(scope, replay, send)


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"Request body is larger than {limit} bytes", param="body", code="body_too_large"
    )


class APIKeyGuard:
    """With keys configured, every route but health and metrics needs one (Bearer or X-API-Key)."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.keys = [k.encode() for k in state.settings.api_key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        auth = _header(scope, b"authorization") or ""
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        given = given or _header(scope, b"x-api-key")
        # Compare against every key so timing reveals neither which key nor how much matched.
        ok = False
        if given:
            candidate = given.encode()
            for key in self.keys:
                ok |= hmac.compare_digest(candidate, key)
        if not ok:
            error = APIError(
                401,
                "Missing or invalid API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _send_error(send, error, scope.get("state", {}).get("request_id"))
            return
        await self.app(scope, receive, send)


class BrowserRedirect:
    """A browser's `GET /` (it accepts text/html) goes to the playground; API clients' doesn't."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/"
            and scope["method"] in ("GET", "HEAD")
            and "text/html" in (_header(scope, b"accept") or "")
        ):
            headers = [(b"location", PLAYGROUND.encode()), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 307, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)
