"""A request's generations (prompts × n) are admitted whole or not at all, and one that could
never fit is told so (400), not asked to retry (real uvicorn, the openai client)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from api_helpers import ENDLESS, FAST, Live, error_of, metric, wait_until

SMALL = {**FAST, "max_sentences": 1}


def _client(server: Live, retries: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="none", max_retries=retries, timeout=60.0
    )


def _held(server: Live) -> float:
    text = server.metrics()
    return metric(text, "sonar_llm_num_requests_running") + metric(
        text, "sonar_llm_num_requests_waiting"
    )


def test_a_request_that_can_never_fit_is_a_400_naming_n_and_the_limit(
    live: Callable[..., Live],
) -> None:
    server = live(max_running=2, max_waiting=3)
    # The SDK retries 503s (twice by default); a 400 it must not retry.
    with _client(server, retries=2) as client, pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="sonar-llm-demo", prompt=["One.", "Two.", "Three."], n=2, extra_body=SMALL
        )
    body = e.value.body
    assert isinstance(body, dict)
    assert body["param"] == "n"
    assert "3 prompt(s) × n=2" in body["message"] and "6 generations" in body["message"]
    assert "at most 5" in body["message"]
    text = server.metrics()
    assert metric(text, "sonar_llm_requests_total", route="/v1/completions", status="400") == 1
    assert metric(text, "sonar_llm_requests_total", route="/v1/completions", status="503") == 0
    assert metric(text, "sonar_llm_rejected_total", reason="queue_full") == 0
    assert metric(text, "sonar_llm_cancelled_total") == 0
    # Exactly at the limit it is served.
    with _client(server, retries=0) as client:
        out = client.completions.create(
            model="sonar-llm-demo", prompt=["One.", "Two.", "Three."], n=1, extra_body=SMALL
        )
    assert len(out.choices) == 3


def test_small_requests_beside_one_that_never_fits_are_all_served(
    live: Callable[..., Live],
) -> None:
    server = live(max_running=2, max_waiting=10)

    def small(i: int) -> int:
        with _client(server, retries=0) as client:
            out = client.completions.create(
                model="sonar-llm-demo", prompt=f"Request {i}.", extra_body=SMALL
            )
            return len(out.choices)

    def big() -> str:
        with _client(server, retries=0) as client:
            try:
                client.completions.create(
                    model="sonar-llm-demo", prompt=["A."] * 16, n=11, extra_body=SMALL
                )
            except openai.BadRequestError as e:
                return str(e.body["param"])  # type: ignore[index]
            return "served"

    with ThreadPoolExecutor(11) as pool:
        refused = pool.submit(big)
        served = list(pool.map(small, range(10)))
    assert refused.result() == "n"
    assert served == [1] * 10


def test_a_request_that_does_not_fit_now_takes_no_place(live: Callable[..., Live]) -> None:
    """Room for one more: a two-choice request gets 503 and leaves that place free."""
    server = live(max_running=1, max_waiting=3)
    endless = {"prompt": "Go on.", "stream": True, **ENDLESS}
    with contextlib.ExitStack() as stack, server.client() as http:
        for _ in range(3):  # 1 running, 2 waiting: one place left
            response = stack.enter_context(http.stream("POST", "/v1/completions", json=endless))
            assert response.status_code == 200
        wait_until(lambda: _held(server) == 3, what="three requests held")
        r = http.post("/v1/completions", json={"prompt": ["A.", "B."], **SMALL})
        assert r.status_code == 503 and error_of(r)["code"] == "queue_full"
        assert "2 asked for" in error_of(r)["message"]
        assert metric(server.metrics(), "sonar_llm_cancelled_total") == 0
        # The place is still free for the next request, at once.
        last = stack.enter_context(http.stream("POST", "/v1/completions", json=endless))
        assert last.status_code == 200
        assert _held(server) == 4
