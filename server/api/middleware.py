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
import zlib
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from starlette.routing import BaseRoute, Match

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
OPEN_PATHS = ("/health", "/metrics", PLAYGROUND.rstrip("/"))
ENCODING = b"content-encoding"
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads the gzip header and trailer
# nginx's "client closed request": counted for a client that left before any answer began.
CLIENT_CLOSED = 499


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
    request_duration per route template (`routes`: the app's, matched in order)."""

    def __init__(self, app: ASGIApp, state: AppState, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status: int | None = None  # the answer's, once it begins
        gone = False  # the client disconnected before any answer began

        async def receive_watching() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect" and status is None:
                gone = True
            return message

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
            await self.app(scope, receive_watching, send_with_id)
        finally:
            if status is None:  # nobody was answered: the client's doing when it left, not a 5xx
                status = CLIENT_CLOSED if gone else 500
            m = self.state.http_metrics
            route = route_of(scope, self.routes)
            m.requests.labels(route, str(status)).inc()
            m.duration.labels(route).observe(time.perf_counter() - start)
            request_id_var.reset(token)


def route_of(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template that serves `scope` ("unmatched" for none), also for requests
    answered before routing (413, 415, 401 by the guards)."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate  # the path, another method (405)
        route = route or partial
    return getattr(route, "path", None) or "unmatched"


class BodyGuard:
    """413 for bodies over the limit, 415 for non-JSON bodies; the body is read once here.

    A `Content-Encoding: gzip` body is decompressed here, under the same limit on its decoded
    size; any other content coding is a 415 naming it (never read as if it were JSON)."""

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
        try:
            coding = _content_coding(_header(scope, ENCODING))
        except APIError as refused:
            await _send_error(send, refused, rid)
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
        if coding is not None:
            try:
                body = decode_gzip(body, self.limit)
            except APIError as refused:
                await _send_error(send, refused, rid)
                return
            scope = {**scope, "headers": [h for h in scope["headers"] if h[0] != ENCODING]}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to go away

        await self.app(scope, replay, send)


def _content_coding(header: str | None) -> str | None:
    """ "gzip" for a gzip body, None for a plain one; 415 naming any other coding."""
    codings = [c.strip().lower() for c in (header or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if codings in (["gzip"], ["x-gzip"]):
        return "gzip"
    raise APIError(
        415,
        f"Content-Encoding {', '.join(codings)} is not supported; send the body as is or gzip",
        param="content-encoding",
        code="unsupported_content_encoding",
    )


def decode_gzip(body: bytes, limit: int) -> bytes:
    """The decompressed body; 413 when it decodes to more than `limit` bytes (a gzip bomb stops
    there, never inflated further), 400 when it is not gzip."""
    inflater = zlib.decompressobj(wbits=GZIP_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise APIError(
            400, f"Request body is not valid gzip: {e}", param="body", code="invalid_gzip"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise APIError(
            413,
            f"Request body decompresses to more than {limit} bytes",
            param="body",
            code="body_too_large",
        )
    if not inflater.eof or inflater.unused_data:
        raise APIError(
            400,
            "Request body is not valid gzip: truncated, or more than one gzip member",
            param="body",
            code="invalid_gzip",
        )
    return out


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
