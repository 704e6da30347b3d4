"""Over real connections (uvicorn on 127.0.0.1): SSE, keep-alive, disconnects, a full queue.

TestClient never disconnects and never sends a body in pieces, so these run against a real
uvicorn server in a background thread (the `live` fixture), with httpx and httpx-sse clients.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from api_helpers import ENDLESS, FAST, Live, break_running_decodes, error_of, metric, wait_until
from httpx_sse import EventSource, connect_sse

PROMPT = "The cat runs home. It is late."
NO_EOS = {"eos_threshold": 1.0}


def idle(live: Live) -> bool:
    """Nothing running, queued or held open over HTTP."""
    engine = live.state.engine
    assert engine is not None
    return engine.num_running == 0 and engine.num_waiting == 0 and live.state.active_requests == 0


def running(live: Live, n: int = 1) -> Callable[[], bool]:
    engine = live.state.engine
    assert engine is not None
    return lambda: engine.num_running == n


def test_sse_stream_is_sentences_then_done(live: Callable[..., Live]) -> None:
    server = live()
    request = {"prompt": PROMPT, "max_sentences": 3, "stream": True, **NO_EOS, **FAST}
    with (
        server.client() as client,
        connect_sse(client, "POST", "/generate", json=request) as events,
    ):
        r = events.response
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        rid = r.headers["x-request-id"]
        received = [(sse.event, sse.json()) for sse in events.iter_sse()]
    names = [name for name, _ in received]
    assert names == ["sentence", "sentence", "sentence", "done"]
    sentences = [data for _, data in received[:-1]]
    assert [s["index"] for s in sentences] == [0, 1, 2]
    assert all(
        s["id"] == rid and s["num_tokens"] > 0 and isinstance(s["text"], str) for s in sentences
    )
    done = received[-1][1]
    assert done["id"] == rid
    assert done["sentences"] == [s["text"] for s in sentences]
    assert done["text"] == " ".join(done["sentences"])
    assert done["finish_reason"] == "length"
    assert done["usage"]["generated_sentences"] == 3
    assert done["usage"]["prompt_sentences"] == 2
    # The same request without streaming says the same.
    with server.client() as client:
        plain = client.post("/generate", json={**request, "stream": False}).json()
    assert plain["sentences"] == done["sentences"]


def test_accept_event_stream_alone_streams(live: Callable[..., Live]) -> None:
    server = live()
    request = {"document": "The cat runs. The dog sleeps.", **NO_EOS, **FAST}
    with (
        server.client() as client,
        client.stream(
            "POST", "/summarize", json=request, headers={"Accept": "text/event-stream"}
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        received = [(sse.event, sse.json()) for sse in EventSource(r).iter_sse()]
    assert [name for name, _ in received] == ["sentence", "done"]
    assert received[1][1]["sentences"] == [received[0][1]["text"]]
    assert received[1][1]["usage"]["prompt_sentences"] == 3


def test_keepalive_pings_while_the_request_waits(live: Callable[..., Live]) -> None:
    server = live(max_running=1, max_waiting=1, keepalive_interval=0.2)
    long = {"prompt": PROMPT, "stream": True, **ENDLESS}
    queued = {"prompt": "Hello there.", "stream": True, **FAST}
    engine = server.state.engine
    assert engine is not None
    # The one running slot is taken by a long request; the next one waits in the queue.
    with server.client() as client, client.stream("POST", "/generate", json=long):
        wait_until(running(server), what="the first request to run")
        with client.stream("POST", "/generate", json=queued) as r:
            assert r.status_code == 200
            wait_until(lambda: engine.num_waiting == 1, what="the second request to queue")
            lines: list[str] = []
            for line in r.iter_lines():
                lines.append(line)
                if lines.count(": ping") >= 2:
                    break
        # Only pings (and the blank lines that end them) while nothing else happens.
        assert {line for line in lines if line} == {": ping"}
    wait_until(lambda: idle(server), what="both requests to be cancelled")


def test_error_after_the_stream_started_is_an_error_event(live: Callable[..., Live]) -> None:
    """A decode that fails after sentences were streamed ends the stream with `event: error`."""
    server = live()
    request = {"prompt": PROMPT, "stream": True, "max_sentences": 50, **FAST}
    with (
        server.client() as client,
        connect_sse(client, "POST", "/generate", json=request) as events,
    ):
        assert events.response.status_code == 200
        received = []
        for sse in events.iter_sse():
            received.append(sse)
            if len(received) == 1:
                assert break_running_decodes(server.state) == 1
    kinds = [sse.event for sse in received]
    assert kinds[0] == "sentence" and kinds[-1] == "error"
    assert set(kinds[:-1]) == {"sentence"}
    body = received[-1].json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == "internal_error"
    assert body["error"]["code"] == "generation_error"
    assert "decode failed" in body["error"]["message"]
    # Only that request failed: the engine goes on serving.
    with server.client() as client:
        ok = client.post("/generate", json={"prompt": PROMPT, "max_sentences": 1, **FAST})
    assert ok.status_code == 200
    assert server.state.ready
    text = server.metrics()
    assert metric(text, "sonar_llm_requests_finished_total", finish_reason="error") == 1


def test_timeout_ends_the_stream_with_done_not_error(live: Callable[..., Live]) -> None:
    server = live()
    request = {"prompt": PROMPT, "stream": True, "timeout": 1.0, **ENDLESS}
    with (
        server.client() as client,
        connect_sse(client, "POST", "/generate", json=request) as events,
    ):
        received = [(sse.event, sse.json()) for sse in events.iter_sse()]
    names = [name for name, _ in received]
    assert names[-1] == "done" and set(names[:-1]) <= {"sentence"}
    done = received[-1][1]
    assert done["finish_reason"] == "timeout"
    assert done["sentences"] == [data["text"] for _, data in received[:-1]]
    assert len(done["sentences"]) < ENDLESS["max_sentences"]
    # Without streaming: 200 with what was generated in time.
    with server.client() as client:
        r = client.post("/generate", json={**request, "stream": False})
    assert r.status_code == 200
    assert r.json()["finish_reason"] == "timeout"
    assert r.json()["usage"]["generated_sentences"] == len(r.json()["sentences"])
    assert idle(server)


STREAMING_ROUTES = [
    ("/generate", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
]
BLOCKING_ROUTES = [
    ("/generate", {"prompt": PROMPT}),
    ("/v1/completions", {"prompt": PROMPT}),
]


@pytest.mark.parametrize(("path", "body"), STREAMING_ROUTES)
def test_client_leaving_a_stream_cancels_the_request(
    live: Callable[..., Live], path: str, body: dict[str, Any]
) -> None:
    server = live()
    with (
        server.client() as client,
        client.stream("POST", path, json={**body, "stream": True, **ENDLESS}) as r,
    ):
        assert r.status_code == 200
        first = next(iter(EventSource(r).iter_sse()))
        assert first.data  # a sentence (or chunk) arrived: the request is running
        assert running(server)()
    # The connection is closed; the engine drops the request at its next step.
    wait_until(lambda: idle(server), what="the request to be cancelled")
    text = server.metrics()
    assert metric(text, "sonar_llm_cancelled_total") == 1
    assert metric(text, "sonar_llm_requests_finished_total", finish_reason="cancelled") == 1
    assert metric(text, "sonar_llm_num_requests_running") == 0


@pytest.mark.parametrize(("path", "body"), BLOCKING_ROUTES)
def test_client_giving_up_on_a_blocking_request_cancels_it(
    live: Callable[..., Live], path: str, body: dict[str, Any]
) -> None:
    server = live()
    with (
        server.client(timeout=httpx.Timeout(10.0, read=1.0)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post(path, json={**body, **ENDLESS})
    wait_until(lambda: idle(server), what="the request to be cancelled")
    text = server.metrics()
    assert metric(text, "sonar_llm_cancelled_total") == 1
    assert metric(text, "sonar_llm_requests_finished_total", finish_reason="cancelled") == 1


def test_full_queue_is_503_with_retry_after(live: Callable[..., Live]) -> None:
    server = live(max_running=1, max_waiting=0)
    with server.client() as client:
        with client.stream("POST", "/generate", json={"prompt": PROMPT, "stream": True, **ENDLESS}):
            wait_until(running(server), what="the long request to run")
            for path, body in [
                ("/generate", {"prompt": "Hello there.", **FAST}),
                ("/generate", {"prompt": "Hello there.", "stream": True, **FAST}),
                ("/v1/completions", {"prompt": "Hello there.", **FAST}),
            ]:
                r = client.post(path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert int(r.headers["retry-after"]) >= 1
                err = error_of(r)
                assert err["type"] == "overloaded_error" and err["code"] == "queue_full"
            text = server.metrics()
            assert metric(text, "sonar_llm_rejected_total", reason="queue_full") == 3
            assert metric(text, "sonar_llm_requests_total", route="/generate", status="503") == 2
            assert metric(text, "sonar_llm_num_requests_running") == 1
        # The long request's client left: the slot frees up and requests are served again.
        wait_until(lambda: idle(server), what="the long request to be cancelled")
        r = client.post("/generate", json={"prompt": "Hello there.", "max_sentences": 1, **FAST})
        assert r.status_code == 200


def test_chunked_body_over_the_limit_is_413(live: Callable[..., Live]) -> None:
    server = live(max_body_bytes=2048)

    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"Hello there. " * 10
        yield b'"}'

    with server.client() as client:
        r = client.post("/generate", content=body(), headers={"Content-Type": "application/json"})
        assert r.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        assert error_of(r)["code"] == "body_too_large"
    with server.client() as client:
        fine = json.dumps({"prompt": "Hello there.", "max_sentences": 1, **FAST}).encode()
        r = client.post(
            "/generate",
            content=iter([fine[:10], fine[10:]]),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200


def test_requests_outliving_the_drain_grace_still_get_an_answer(live: Callable[..., Live]) -> None:
    """SIGTERM with requests that would run far longer than `shutdown_grace`: when the grace is
    over they end with finish_reason "cancelled" (not cut off), and the server stops."""
    server = live(draining=True, shutdown_grace=1.0)
    blocking: list[httpx.Response] = []

    def post() -> None:
        with server.client() as c:
            blocking.append(c.post("/generate", json={"prompt": PROMPT, **ENDLESS}))

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    request = {"prompt": PROMPT, "stream": True, **ENDLESS}
    with server.client() as client, client.stream("POST", "/generate", json=request) as r:
        events = EventSource(r).iter_sse()
        assert next(events).event == "sentence"
        wait_until(running(server, 2), what="both requests to run")
        server.server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
        rest = [(sse.event, sse.json()) for sse in events]
    assert rest[-1][0] == "done"
    assert rest[-1][1]["finish_reason"] == "cancelled"
    thread.join(60)
    (answer,) = blocking
    assert answer.status_code == 200
    assert answer.json()["finish_reason"] == "cancelled"
    assert answer.json()["usage"]["generated_sentences"] == len(answer.json()["sentences"])
    server.thread.join(60)
    assert not server.thread.is_alive()
