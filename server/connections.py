"""Connection-level limits uvicorn lacks: read timeouts, a connection cap, JSON protocol errors.

uvicorn reads request headers and bodies for as long as a client cares to send them, and keeps
every connection it accepts. `protocol_class(settings)` returns a subclass of uvicorn's h11
protocol (passed as `uvicorn.Config(http=...)`) that adds:

- **Header timeout.** A request's headers must be complete within `read_timeout` seconds of its
  first byte (of the connection, for its first request): a total deadline, so a client that
  trickles one byte a second gets no further. Between requests an idle keep-alive connection is
  uvicorn's `timeout_keep_alive` business (closed silently).
- **Body timeout.** While a request body is being received, `read_timeout` seconds without a
  byte end it (an inactivity timer, reset by every chunk, paused while the server itself has
  stopped reading for back-pressure), and so does `body_timeout` seconds in all (a total
  deadline: a body trickled a byte at a time never resets it).
  Both answer **408** with the error envelope and `Connection: close`, then close.
- **Connection cap.** Beyond `max_connections` open connections, a small reserve
  (`reserve_connections`) is still accepted: its requests to `/health` and `/health/...` are
  served (so probes see the truth under load) and anything else is answered **503** with
  `Retry-After`;
  each closes after one answer. Beyond the reserve a connection is answered 503 at once, before
  any of its bytes are read, and closed.
- **Protocol errors** (malformed HTTP: 400; a request head over h11's limit, 16 KiB unless
  uvicorn's `h11_max_incomplete_event_size` says otherwise: 431) in the envelope instead of
  uvicorn's plain text. The head is measured however it arrives (h11 itself only checks a head
  still incomplete after a read).

Timed-out and refused connections are counted in `sonar_llm_connections_rejected_total{reason}`
and open ones in `sonar_llm_connections_open`.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from prometheus_client import CollectorRegistry, Counter, Gauge
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import envelope

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

DEFAULT_MAX_CONNECTIONS = 1024
# File descriptors kept for everything but client sockets (model files, logs, the listening
# socket, the reserve above the cap, threads' pipes).
SPARE_FDS = 128
# How long a refused connection may keep its socket open so the answer is read before the close
# (closing with unread request bytes would send a reset that can destroy it).
LINGER_S = 1.0
HEALTH = "/health"  # and every path under it
RETRY_AFTER = "1"


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most `wanted`); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def default_max_connections() -> int:
    """1024, or fewer when the process may not open that many files (soft limit − 128)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - SPARE_FDS))


def connection_cap(max_connections: int | None) -> int:
    """The cap in force: the setting, or `default_max_connections()` when it is unset."""
    return max_connections if max_connections is not None else default_max_connections()


def reserve_for(max_connections: int) -> int:
    """Connections accepted above the cap for health probes: max(8, max_connections / 32)."""
    return max(8, max_connections // 32)


class ConnectionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "sonar_llm_connections_open", "Open client connections", registry=registry
        )
        self.rejected = Counter(
            "sonar_llm_connections_rejected",
            "Connections answered and closed by the connection guard, by reason",
            ("reason",),
            registry=registry,
        )
        for reason in ("header_timeout", "body_timeout", "too_many_connections", "invalid_http"):
            self.rejected.labels(reason)


def error_bytes(
    status: int,
    message: str,
    code: str,
    *,
    param: str | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """A complete HTTP/1.1 response carrying the error envelope, closing the connection."""
    type_ = {408: "timeout_error", 503: "overloaded_error"}.get(status, "invalid_request_error")
    body = json.dumps(envelope(message, type_, param, code)).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    all_headers = [
        *headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    lines += [k + b": " + v for k, v in all_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _over_cap_app(app: ASGIApp, metrics: ConnectionMetrics | None) -> ASGIApp:
    """For a connection over the cap: health routes pass (then close), the rest get 503."""

    async def guarded(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"] == HEALTH or scope["path"].startswith(HEALTH + "/"):

            async def send_close(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                await send(message)

            await app(scope, receive, send_close)
            return
        if metrics is not None:
            metrics.rejected.labels("too_many_connections").inc()
        error = envelope(
            "Too many open connections; retry later",
            "overloaded_error",
            None,
            "too_many_connections",
        )
        body = json.dumps(error).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", RETRY_AFTER.encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return guarded


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits above; made per server by `protocol_class`."""

    read_timeout: ClassVar[float] = 30.0
    body_timeout: ClassVar[float] = 60.0
    max_connections: ClassVar[int] = DEFAULT_MAX_CONNECTIONS
    reserve: ClassVar[int] = 8
    metrics: ClassVar[ConnectionMetrics | None] = None
    # Per server (each class made by `protocol_class` has its own sets).
    over_cap: ClassVar[set[GuardedH11Protocol]]
    lingering: ClassVar[set[GuardedH11Protocol]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None  # the whole body's
        self._header_bytes = 0
        self._head = b""  # the start of a request, up to the header limit, to measure it
        self._refused = False  # answered by the guard; further bytes are discarded
        self._counted = False

    # ----- connection life -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        normal = len(self.connections) - len(self.over_cap)
        if normal >= self.max_connections:
            if len(self.over_cap) >= self.reserve:
                self.transport = transport
                self._refuse(
                    error_bytes(
                        503,
                        "Too many open connections; retry later",
                        "too_many_connections",
                        headers=[(b"retry-after", RETRY_AFTER.encode())],
                    ),
                    "too_many_connections",
                )
                return
            self.over_cap.add(self)
            self.app = _over_cap_app(self.app, self.metrics)
        super().connection_made(transport)
        self._counted = True
        if self.metrics is not None:
            self.metrics.open.inc()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timers = (self._header_timer, self._body_timer, self._linger_timer, self._deadline_timer)
        for timer in timers:
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._linger_timer = None
        self._deadline_timer = None
        self.over_cap.discard(self)
        self.lingering.discard(self)
        if self._counted:
            self._counted = False
            if self.metrics is not None:
                self.metrics.open.dec()
            super().connection_lost(exc)
        elif exc is None:
            self.transport.close()

    def shutdown(self) -> None:
        if self._refused:
            self.transport.close()  # answered already; h11's state is not ours to advance
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # an answered connection: only waiting for the client to read and close
        if self.conn.their_state is h11.IDLE:
            self._header_bytes += len(data)
            self._arm_header_timer()  # a new request's first bytes (after keep-alive idling)
            if self._headers_too_large(data):
                self._header_bytes = self._max_header_bytes() + 1
                self.send_400_response("headers too large")  # 431
                return
        super().data_received(data)
        self._track_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._refused:
            self._track_state()

    def _headers_too_large(self, data: bytes) -> bool:
        """Whether this request's head (request line and headers) is over the limit.

        h11 checks its limit only on a head still incomplete after a read, so a large head that
        arrives in one read passed; here the head is measured however it arrives.
        """
        limit = self._max_header_bytes()
        self._head += data[: limit + 4 - len(self._head)]  # never more than the limit holds
        end = self._head.find(b"\r\n\r\n")
        return end > limit or (end == -1 and len(self._head) > limit + 3)

    def _track_state(self) -> None:
        """Disarm the header timer once headers are complete; (re)arm the body timer."""
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._header_bytes = 0
            self._head = b""
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if state is h11.SEND_BODY and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.read_timeout, self._body_timed_out)
            if self._deadline_timer is None:  # armed once per body: a total, never reset
                self._deadline_timer = self.loop.call_later(
                    self.body_timeout, self._body_deadline_passed
                )
        elif state is not h11.SEND_BODY and self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    # ----- timers --------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self._refused:
            self._header_timer = self.loop.call_later(self.read_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still going out; its request was complete
        self._unset_keepalive_if_required()
        seconds = f"{self.read_timeout:g}"
        self._refuse(
            error_bytes(
                408,
                f"Request headers not received within {seconds} s",
                "header_timeout",
                headers=self.server_state.default_headers,
            ),
            "header_timeout",
        )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        seconds = f"{self.read_timeout:g}"
        self._end_body(f"Request body stalled: no data for {seconds} s", self._body_timed_out)

    def _body_deadline_passed(self) -> None:
        self._deadline_timer = None
        seconds = f"{self.body_timeout:g}"
        self._end_body(f"Request body not complete within {seconds} s", self._body_deadline_passed)

    def _end_body(self, message: str, again: Callable[[], None]) -> None:
        """408 for a body that came too slowly (`message` says how), unless it is done."""
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.flow.read_paused:
            # The server stopped reading (the app has not taken the buffered body yet): not the
            # client's stall. Look again later.
            if again == self._body_timed_out:
                self._body_timer = self.loop.call_later(self.read_timeout, again)
            else:
                self._deadline_timer = self.loop.call_later(self.read_timeout, again)
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            return  # the app answers already (it did not wait for the body): leave it be
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() sees a disconnect; its sends drop
            cycle.message_event.set()
            response = error_bytes(
                408,
                message,
                "body_timeout",
                param="body",
                headers=self.server_state.default_headers,
            )
        else:
            response = b""  # answered already; the rest of the body never came
        self._refuse(response, "body_timeout")

    # ----- answers -------------------------------------------------------------------------
    def _refuse(self, response: bytes, reason: str) -> None:
        """Write `response`, stop reading the request, and close once the client has it."""
        self._refused = True
        for timer in (self._header_timer, self._body_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._deadline_timer = None
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
        transport = self.transport
        if response:
            transport.write(response)
        # Half-close: the answer and a FIN go out now; the socket closes when the client closes
        # its side or after LINGER_S. Closing at once with request bytes still unread would
        # make the kernel send a reset, which can destroy the answer before the client reads it.
        if len(self.lingering) >= 4 * self.reserve + 64 or not transport.can_write_eof():
            transport.close()
            return
        self.lingering.add(self)
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            transport.close()
            return
        self._linger_timer = self.loop.call_later(LINGER_S, transport.close)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to malformed HTTP, in the envelope (431 for oversized headers)."""
        if self._header_bytes > self._max_header_bytes():
            status, message, code = 431, "Request headers are too large", "headers_too_large"
        else:
            status, message, code = 400, "Invalid HTTP request", "invalid_http"
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:
                self._refuse(b"", "invalid_http")
                return
        self._refuse(
            error_bytes(status, message, code, headers=self.server_state.default_headers),
            "invalid_http",
        )

    def _max_header_bytes(self) -> int:
        size = self.config.h11_max_incomplete_event_size
        return size if size is not None else DEFAULT_MAX_INCOMPLETE_EVENT_SIZE


def protocol_class(
    *,
    read_timeout: float,
    body_timeout: float,
    max_connections: int | None,
    registry: CollectorRegistry | None = None,
) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its limits, metrics and its own connection sets."""
    cap = connection_cap(max_connections)
    attrs: dict[str, Any] = {
        "read_timeout": read_timeout,
        "body_timeout": body_timeout,
        "max_connections": cap,
        "reserve": reserve_for(cap),
        "metrics": ConnectionMetrics(registry) if registry is not None else None,
        "over_cap": set(),
        "lingering": set(),
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)
