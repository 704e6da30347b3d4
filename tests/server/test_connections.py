"""Slow and idle sockets, the connection cap and malformed HTTP, against a real uvicorn server.

Raw sockets on loopback play the misbehaving clients (partial request lines, partial headers,
stalled bodies, trickled bytes); httpx plays the well-behaved one beside them.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from api_helpers import FAST, Live, error_of, metric, wait_until

READ_TIMEOUT = 1.0
MARGIN = 3.0  # the 2-core machine is shared: generous, and still far below "forever"

PARTIAL_LINE = b"GET /health/li"
PARTIAL_HEADERS = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: "
PARTIAL_BODY = (
    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b'Content-Length: 200\r\n\r\n{"prompt": "Hello'
)


@dataclass
class Answer:
    """What a raw client read until the server closed (or the deadline passed)."""

    data: bytes = b""
    closed_at: float | None = None

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])

    @property
    def headers(self) -> dict[str, str]:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head)}

    @property
    def error(self) -> dict[str, object]:
        body = json.loads(self.data.split(b"\r\n\r\n", 1)[1])
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]  # type: ignore[no-any-return]


@dataclass
class Clients:
    """Raw sockets to one server; closed at the end of the test."""

    port: int
    socks: list[socket.socket] = field(default_factory=list)

    def open(self, first_bytes: bytes = b"") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        if first_bytes:
            s.sendall(first_bytes)
        self.socks.append(s)
        return s

    def read_all(self, socks: list[socket.socket], timeout: float) -> list[Answer]:
        """Read every socket until the server closes it or `timeout` passes."""
        start = time.monotonic()
        answers = {s: Answer() for s in socks}
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        open_ = set(socks)
        while open_ and time.monotonic() - start < timeout:
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    answers[s].data += chunk
                else:
                    answers[s].closed_at = time.monotonic() - start
                    sel.unregister(s)
                    open_.discard(s)
        sel.close()
        return [answers[s] for s in socks]

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


@pytest.fixture
def raw() -> Iterator[Callable[[Live], Clients]]:
    made: list[Clients] = []

    def make(server: Live) -> Clients:
        made.append(Clients(server.port))
        return made[-1]

    yield make
    for clients in made:
        clients.close()


def open_connections(server: Live) -> int:
    return len(server.server.server_state.connections)


def test_300_slow_connections_get_408_while_normal_requests_succeed(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    server = live(read_timeout=READ_TIMEOUT)
    clients = raw(server)
    kinds = [PARTIAL_LINE, PARTIAL_HEADERS, PARTIAL_BODY, b""]  # b"": connects, sends nothing
    start = time.monotonic()
    socks = [clients.open(kinds[i % len(kinds)]) for i in range(300)]
    opened = time.monotonic() - start

    # During the attack a well-behaved client is served.
    with server.client() as c:
        assert c.get("/health/ready").status_code == 200
        r = c.post("/generate", json={"prompt": "Hello there.", "max_sentences": 1, **FAST})
        assert r.status_code == 200, r.text
        assert r.json()["sentences"]

    answers = clients.read_all(socks, READ_TIMEOUT + opened + MARGIN)
    for kind, answer in zip(kinds * 75, answers, strict=True):
        assert answer.closed_at is not None, f"{kind!r}: still open after the timeout"
        assert answer.status == 408, (kind, answer.data[:200])
        assert answer.headers["connection"] == "close"
        error = answer.error
        expected = "body_timeout" if kind is PARTIAL_BODY else "header_timeout"
        assert error["code"] == expected, error
    wait_until(lambda: open_connections(server) == 0, 10, "the slow connections to be gone")
    text = server.metrics()
    rejected = "sonar_llm_connections_rejected_total"
    assert metric(text, rejected, reason="header_timeout") == 225
    assert metric(text, rejected, reason="body_timeout") == 75
    with server.client() as c:  # and afterwards too
        assert c.get("/health/live").status_code == 200


def test_header_deadline_is_total_but_body_timeout_is_inactivity(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    server = live(read_timeout=READ_TIMEOUT)
    clients = raw(server)
    # One header byte every 0.2 s (the recv timeout paces the client: the workload, not a wait)
    # never completes the headers: 408 after the deadline, although the client never paused
    # for read_timeout. The loop's bound only keeps a broken server from hanging the test.
    trickler = clients.open(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
    start = time.monotonic()
    got = b""
    trickler.settimeout(0.2)
    while time.monotonic() - start < READ_TIMEOUT + MARGIN:
        try:
            trickler.sendall(b"X")
        except OSError:
            break
        try:
            chunk = trickler.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b'"header_timeout"' in got

    # A body that pauses less than read_timeout between chunks, for longer than read_timeout in
    # all, is read to the end and answered.
    body = json.dumps({"prompt": "Hello there.", "max_sentences": 1, **FAST}).encode()
    s = clients.open(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
    pause = READ_TIMEOUT * 1.8 / len(pieces)
    for piece in pieces:
        time.sleep(pause)  # the workload: a slow client, never silent for read_timeout
        s.sendall(piece)
    [answer] = clients.read_all([s], 60)
    assert answer.status == 200, answer.data[:300]


def test_connection_cap_answers_503_and_keeps_health_reachable(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    cap = 20
    server = live(read_timeout=30.0, max_connections=cap)  # the idle sockets are not timed out
    reserve = 8  # max(8, cap // 32)
    clients = raw(server)
    idle = [clients.open() for _ in range(cap)]
    wait_until(lambda: open_connections(server) == cap, 10, "the idle connections")

    # Over the cap: a request that is not a health check gets 503 with the envelope.
    with server.client() as c:
        r = c.get("/info")
        assert r.status_code == 503
        assert error_of(r)["code"] == "too_many_connections"
        assert r.headers["retry-after"] == "1"
        # ...and a health probe still gets through.
        r = c.get("/health/ready")
        assert r.status_code == 200, r.text
        r = c.post("/generate", json={"prompt": "Hello there."})
        assert r.status_code == 503 and error_of(r)["code"] == "too_many_connections"

    # Fill the reserve too: then a new connection is answered 503 before anything is read.
    extra = [clients.open() for _ in range(reserve)]
    wait_until(lambda: open_connections(server) == cap + reserve, 10, "the reserve to fill")
    silent = clients.open()  # sends nothing
    eager = clients.open(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # sends at once
    for answer in clients.read_all([silent, eager], MARGIN):
        assert answer.closed_at is not None
        assert answer.status == 503, answer.data[:200]
        assert answer.headers["retry-after"] == "1"
        assert answer.error["code"] == "too_many_connections"
    assert open_connections(server) == cap + reserve

    # Once connections close, new ones are served again.
    for s in idle + extra:
        s.close()
    wait_until(lambda: open_connections(server) == 0, 10, "the connections to close")
    with server.client() as c:
        assert c.get("/info").status_code == 200
    text = server.metrics()
    assert metric(text, "sonar_llm_connections_rejected_total", reason="too_many_connections") == 4
    assert metric(text, "sonar_llm_connections_open") == 1  # the one asking


def test_malformed_http_and_huge_headers_get_the_envelope(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    server = live(read_timeout=5.0)
    clients = raw(server)
    bad = clients.open(b"NOT HTTP AT ALL\r\n\r\n")
    huge = clients.open(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
    answers = clients.read_all([bad, huge], 10)
    assert answers[0].status == 400, answers[0].data[:200]
    assert answers[0].error["code"] == "invalid_http"
    assert answers[1].status == 431, answers[1].data[:200]
    assert answers[1].error["code"] == "headers_too_large"
    assert all(a.closed_at is not None for a in answers)


def test_head_on_health_routes(live: Callable[..., Live]) -> None:
    server = live()
    with server.client() as c:
        for path in ("/health/live", "/health/ready"):
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code == 200
            assert head.content == b""
            for name in ("content-type", "content-length"):
                assert head.headers[name] == got.headers[name], name
        server.state.status = "draining"  # readiness 503 (what SIGTERM does first)
        got, head = c.get("/health/ready"), c.head("/health/ready")
        assert head.status_code == got.status_code == 503
        assert head.headers["retry-after"] == got.headers["retry-after"] == "5"
        assert head.content == b""
        assert head.headers["content-length"] == got.headers["content-length"]


@pytest.mark.parametrize("size", [17_000, 70_000, 100_000])
def test_a_whole_head_over_16_kib_gets_431_however_it_arrives(
    live: Callable[..., Live], raw: Callable[[Live], Clients], size: int
) -> None:
    """h11 checks only a head still incomplete after a read; one sent whole is measured too."""
    server = live()
    clients = raw(server)
    head = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    small = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 15_000 + b"\r\n\r\n"
    big, fine = clients.open(head), clients.open(small)
    answers = clients.read_all([big], 10)
    assert answers[0].status == 431, answers[0].data[:200]
    assert answers[0].error["code"] == "headers_too_large"
    assert answers[0].closed_at is not None
    fine.settimeout(10)
    assert fine.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_a_trickled_body_gets_408_at_the_total_body_deadline(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    deadline = 1.0
    server = live(read_timeout=30.0, body_timeout=deadline)
    s = raw(server).open(PARTIAL_BODY)
    # A byte every 0.1 s: never a pause near read_timeout, but never done either.
    start = time.monotonic()
    got = b""
    s.settimeout(0.1)
    while time.monotonic() - start < deadline + MARGIN:
        try:
            s.sendall(b"x")
            chunk = s.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        got += chunk
    elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    body = json.loads(got.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "body_timeout"
    assert "not complete within 1 s" in body["error"]["message"]
    assert deadline * 0.9 <= elapsed < deadline + MARGIN
    text = server.metrics()
    assert metric(text, "sonar_llm_connections_rejected_total", reason="body_timeout") == 1


def _requests(server: Live, **labels: str) -> float:
    return metric(server.metrics(), "sonar_llm_requests_total", **labels)


def test_a_client_leaving_mid_body_is_a_499_not_a_500(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    server = live()
    clients = raw(server)
    for _ in range(3):
        s = clients.open(PARTIAL_BODY)
        s.close()
    wait_until(
        lambda: _requests(server, route="/generate", status="499") == 3,
        what="three disconnects counted as 499",
    )
    assert _requests(server, status="500") == 0
    assert _requests(server, route="unmatched") == 0


def test_413_and_415_carry_their_route(
    live: Callable[..., Live], raw: Callable[[Live], Clients]
) -> None:
    server = live(max_body_bytes=2048)
    clients = raw(server)
    post = b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    too_big = clients.open(post + b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
    wrong = clients.open(post + b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi")
    coded = clients.open(
        post + b"Content-Type: application/json\r\nContent-Encoding: br\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    answers = clients.read_all([too_big, wrong, coded], 10)
    assert [a.status for a in answers] == [413, 415, 415]
    assert answers[2].error["code"] == "unsupported_content_encoding"
    assert "br" in str(answers[2].error["message"])
    assert _requests(server, route="/generate", status="413") == 1
    assert _requests(server, route="/generate", status="415") == 2
    assert _requests(server, route="unmatched") == 0
