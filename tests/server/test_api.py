"""The HTTP API in-process (TestClient): every route's answer, each error status, auth, CORS.

What needs real connections (SSE clients, disconnects, queue pressure) is in
test_streaming.py; the `sonar-llm serve` process (drain on SIGTERM, JSON logs) in
test_live_server.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import FAST, error_of, metric, ready_client, settings, wait_until
from fastapi.testclient import TestClient
from helpers import fast_options

from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.api.app import create_app
from server.engine import LLM, FinalEvent, GenerationRequest

PROMPT = "The cat runs home. It is late."
DOCUMENT = "The cat runs. The dog sleeps. The sun sets."
# EOS never matches: exactly max_sentences sentences, whatever the random weights say.
NO_EOS = {"eos_threshold": 1.0}
LIMIT = 4  # max_sentences_limit of the shared client


@pytest.fixture(scope="module")
def client(pipe: SonarLLMPipeline) -> Iterator[TestClient]:
    """One ready app for the read-only checks of this module."""
    with ready_client(create_app(settings(max_sentences_limit=LIMIT), pipe=pipe)) as c:
        yield c


def model_name(client: TestClient) -> str:
    return str(client.get("/v1/models").json()["data"][0]["id"])


# ----- native generation ------------------------------------------------------------------
def test_generate_answers_sentences_text_and_usage(client: TestClient) -> None:
    r = client.post("/generate", json={"prompt": PROMPT, "max_sentences": 2, **NO_EOS, **FAST})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "generation"
    assert body["id"] == r.headers["x-request-id"]
    assert body["model"] == model_name(client)
    assert len(body["sentences"]) == 2
    assert all(isinstance(s, str) for s in body["sentences"])
    assert body["text"] == " ".join(body["sentences"])
    assert body["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_sentences"] == 2
    assert usage["generated_sentences"] == 2
    assert usage["decoded_tokens"] >= 2
    assert usage["time_to_first_sentence"] is not None
    assert usage["total_time"] >= usage["queue_time"] >= 0
    assert body["embeddings"] is None


def test_generate_gives_the_model_layers_sentences(
    client: TestClient, pipe: SonarLLMPipeline
) -> None:
    """The server adds batching and HTTP, never different text."""
    final = list(LLM(pipe).stream(PROMPT, fast_options(max_sentences=3)))[-1]
    assert isinstance(final, FinalEvent)
    r = client.post("/generate", json={"prompt": PROMPT, "max_sentences": 3, "max_tokens": 40})
    assert r.status_code == 200
    assert r.json()["sentences"] == final.sentences
    assert r.json()["finish_reason"] == final.finish_reason


def test_return_embeddings_gives_each_sentences_embedding(
    client: TestClient, pipe: SonarLLMPipeline
) -> None:
    r = client.post(
        "/generate",
        json={"prompt": PROMPT, "max_sentences": 2, "return_embeddings": True, **NO_EOS, **FAST},
    )
    body = r.json()
    dim = pipe.model.config.embed_dim
    assert len(body["embeddings"]) == len(body["sentences"]) == 2
    assert all(len(e) == dim for e in body["embeddings"])
    # Each is the SONAR embedding of the sentence's text (what joins the model's context).
    for text, emb in zip(body["sentences"], body["embeddings"], strict=True):
        again = client.post("/embed", json={"texts": [text]}).json()["embeddings"][0]
        assert torch.allclose(torch.tensor(emb), torch.tensor(again), atol=1e-4)


def test_summarize_writes_one_sentence_by_default(client: TestClient) -> None:
    r = client.post("/summarize", json={"document": DOCUMENT, **NO_EOS, **FAST})
    assert r.status_code == 200
    body = r.json()
    assert len(body["sentences"]) == 1
    assert body["text"] == body["sentences"][0]
    assert body["finish_reason"] == "length"
    # The document's three sentences and the instruction sentence.
    assert body["usage"]["prompt_sentences"] == 4

    r = client.post(
        "/summarize",
        json={"document": DOCUMENT, "num_sentences": 2, "instruction": "Sum up.", **NO_EOS, **FAST},
    )
    assert len(r.json()["sentences"]) == 2
    assert r.json()["usage"]["prompt_sentences"] == 4


# ----- OpenAI-compatible ------------------------------------------------------------------
def test_v1_models_lists_the_served_model(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert len(body["data"]) == 1
    card = body["data"][0]
    assert card["object"] == "model" and card["id"] and isinstance(card["created"], int)
    assert card["id"] == client.get("/info").json()["model"]


def test_v1_completions_answers_the_same_text_as_generate(client: TestClient) -> None:
    knobs = {"max_sentences": 2, "max_tokens": 30}
    native = client.post("/generate", json={"prompt": PROMPT, **knobs}).json()
    r = client.post(
        "/v1/completions", json={"model": model_name(client), "prompt": PROMPT, **knobs}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == model_name(client)
    (choice,) = body["choices"]
    assert choice["text"] == native["text"]
    assert choice["finish_reason"] == ("stop" if native["finish_reason"] == "stop" else "length")
    assert body["usage"]["prompt_tokens"] == 2  # sentences, the model's unit
    assert body["usage"]["completion_tokens"] == len(native["sentences"])
    assert body["usage"]["total_tokens"] == 2 + len(native["sentences"])
    assert body["usage"]["decoded_tokens"] == native["usage"]["decoded_tokens"]
    # A one-element list is the same prompt.
    listed = client.post("/v1/completions", json={"prompt": [PROMPT], **knobs}).json()
    assert listed["choices"][0]["text"] == native["text"]


def test_v1_chat_completions_accepts_text_and_list_of_parts(client: TestClient) -> None:
    knobs = {"max_sentences": 2, "max_tokens": 30, **NO_EOS}
    as_text = {"role": "user", "content": PROMPT}
    as_parts = {
        "role": "user",
        "content": [
            {"type": "text", "text": "The cat runs home."},
            {"type": "text", "text": "It is late."},
        ],
    }
    answers = []
    for message in (as_text, as_parts):
        r = client.post("/v1/chat/completions", json={"messages": [message], **knobs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == 2
        assert body["usage"]["completion_tokens"] == 2
        answers.append(choice["message"]["content"])
    assert answers[0] == answers[1]
    native = client.post("/generate", json={"prompt": PROMPT, **knobs}).json()
    assert answers[0] == native["text"]


# ----- SONAR as a service -------------------------------------------------------------------
def test_embed_and_decode(client: TestClient, pipe: SonarLLMPipeline) -> None:
    texts = ["Hello there.", "The cat runs home."]
    r = client.post("/embed", json={"texts": texts})
    assert r.status_code == 200
    body = r.json()
    dim = pipe.model.config.embed_dim
    assert body["dim"] == dim and body["object"] == "list"
    assert len(body["embeddings"]) == 2 and all(len(e) == dim for e in body["embeddings"])
    expected = pipe.codec.encode(texts, "eng_Latn")
    assert torch.allclose(torch.tensor(body["embeddings"]), expected, atol=1e-4)

    r = client.post("/decode", json={"embeddings": body["embeddings"], "max_tokens": 24})
    assert r.status_code == 200
    decoded = r.json()
    want = pipe.codec.decode(expected, "eng_Latn", DecodeOptions(max_tokens=24))
    assert decoded["texts"] == [d.text for d in want]
    assert decoded["decoded_tokens"] == sum(d.num_tokens for d in want)


def test_decode_names_the_embedding_of_the_wrong_size(
    client: TestClient, pipe: SonarLLMPipeline
) -> None:
    dim = pipe.model.config.embed_dim
    r = client.post("/decode", json={"embeddings": [[0.1] * dim, [0.1] * (dim - 1)]})
    assert r.status_code == 400
    assert error_of(r)["param"] == "embeddings.1"
    r = client.post("/decode", json={"embeddings": [[0.0, 1.0, 2.0]]})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "embeddings.0"
    assert str(dim) in err["message"]


# ----- health, info, metrics ---------------------------------------------------------------
def test_health_and_info(client: TestClient, pipe: SonarLLMPipeline) -> None:
    assert client.get("/health/live").json() == {"status": "ok", "detail": None}
    r = client.get("/health/ready")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["model"] == model_name(client)
    assert info["embed_dim"] == pipe.model.config.embed_dim
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["demo"] is False
    assert info["limits"]["max_sentences"] == LIMIT
    assert set(info["encoder_cache"]) == {"size", "capacity", "hits", "misses"}
    memory = info["cache_memory"]
    assert memory["limit_bytes"] == memory["pages"] * memory["page_bytes"] > 0
    assert memory["allocated_bytes"] == {"llm": 0, "decoder": 0}


ENGINE_METRICS = [
    "sonar_llm_queue_time_seconds",
    "sonar_llm_time_to_first_sentence_seconds",
    "sonar_llm_inter_sentence_latency_seconds",
    "sonar_llm_sentences_generated",
    "sonar_llm_prompt_sentences",
    "sonar_llm_decoded_tokens",
    "sonar_llm_num_requests_running",
    "sonar_llm_num_requests_waiting",
    "sonar_llm_batch_size",
    "sonar_llm_cache_bytes",
    "sonar_llm_cache_memory_limit_bytes",
    "sonar_llm_cache_reserved_bytes",
    "sonar_llm_cache_usage_ratio",
    "sonar_llm_decoder_rows",
    "sonar_llm_encoder_cache_hits",
    "sonar_llm_encoder_cache_misses",
    "sonar_llm_rejected",
    "sonar_llm_cancelled",
]


def test_metrics_expose_every_documented_name(client: TestClient) -> None:
    client.post("/generate", json={"prompt": PROMPT, "max_sentences": 2, **NO_EOS, **FAST})
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ["sonar_llm_requests_total", "sonar_llm_request_duration_seconds"]:
        assert f"# TYPE {name} " in text, name
    for name in ENGINE_METRICS:
        assert re.search(rf"^# TYPE {name}(_total)? ", text, re.M), name
    for name in ["sonar_llm_rejected_total", "sonar_llm_cancelled_total"]:
        assert f"# TYPE {name} counter" in text, name
    assert metric(text, "sonar_llm_requests_total", route="/generate", status="200") >= 1
    assert metric(text, "sonar_llm_request_duration_seconds_count", route="/generate") >= 1
    assert metric(text, "sonar_llm_sentences_generated_total") >= 2
    assert metric(text, "sonar_llm_inter_sentence_latency_seconds_count") >= 1
    assert metric(text, "sonar_llm_decoded_tokens_total") >= 2
    assert metric(text, "sonar_llm_prompt_sentences_total") >= 2
    # The request finished: nothing is left in the decoder batch.
    assert metric(text, "sonar_llm_decoder_rows") == 0
    for cache in ("llm", "decoder"):
        for st in ("allocated", "used"):
            assert metric(text, "sonar_llm_cache_bytes", cache=cache, state=st) == 0
    assert metric(text, "sonar_llm_cache_reserved_bytes") == 0
    assert metric(text, "sonar_llm_cache_memory_limit_bytes") > 0
    assert metric(text, "sonar_llm_model_info", model=model_name(client), device="cpu") == 1


# ----- errors -------------------------------------------------------------------------------
BAD_REQUESTS: list[tuple[str, dict[str, Any], str, str]] = [
    ("/generate", {"prompt": "Hi.", "max_sentences": "many"}, "max_sentences", "int_type"),
    ("/generate", {"prompt": "Hi.", "max_sentences": 0}, "max_sentences", "greater_than_equal"),
    ("/generate", {"prompt": "Hi.", "temperature": 11}, "temperature", "less_than_equal"),
    ("/generate", {"prompt": "Hi.", "beam_size": 1.5}, "beam_size", "int_type"),
    ("/generate", {"prompt": "Hi.", "colour": "blue"}, "colour", "extra_forbidden"),
    ("/generate", {"prompt": ""}, "prompt", "string_too_short"),
    ("/generate", {"prompt": "   "}, "prompt", "invalid_value"),
    ("/generate", {"max_sentences": 1}, "prompt", "missing"),
    (
        "/generate",
        {"prompt": "Hi.", "source_lang": "english"},
        "source_lang",
        "string_pattern_mismatch",
    ),
    ("/generate", {"prompt": "Hi.", "source_lang": "xxx_Xxxx"}, "source_lang", "invalid_value"),
    ("/generate", {"prompt": "Hi.", "target_lang": "qqq_Zzzz"}, "target_lang", "invalid_value"),
    ("/generate", {"prompt": "Hi.", "max_sentences": LIMIT + 1}, "max_sentences", "invalid_value"),
    ("/generate", {"prompt": "Hi.", "top_p": 0.5}, "temperature", "invalid_value"),
    ("/generate", {"prompt": "Hi.", "temperature": 1e-40}, "temperature", "invalid_value"),
    ("/summarize", {"document": "Hi.", "num_sentences": 0}, "num_sentences", "greater_than_equal"),
    (
        "/summarize",
        {"document": "Hi.", "num_sentences": LIMIT + 1},
        "num_sentences",
        "invalid_value",
    ),
    ("/summarize", {"text": "Hi."}, "document", "missing"),
    ("/v1/completions", {"prompt": "Hi.", "n": 17}, "n", "less_than_equal"),
    ("/v1/completions", {"prompt": " "}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": ["One."] * 17}, "prompt", "too_long"),
    ("/v1/completions", {"prompt": ["One.", " "]}, "prompt.1", "invalid_value"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi."}], "tools": [{}]},
        "tools",
        "unsupported_parameter",
    ),
    ("/v1/completions", {"prompt": "Hi.", "max_tokens": 2}, "max_tokens", "greater_than_equal"),
    (
        "/v1/completions",
        {"prompt": "Hi.", "max_sentences": LIMIT + 1},
        "max_sentences",
        "invalid_value",
    ),
    ("/v1/chat/completions", {"messages": []}, "messages", "too_short"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "Hi."}]},
        "messages.0.role",
        "literal_error",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages.0.content",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": ""}]},
        "messages",
        "invalid_value",
    ),
    ("/embed", {"texts": []}, "texts", "too_short"),
    ("/embed", {"texts": ["Hi."], "lang": "xxx_Xxxx"}, "lang", "invalid_value"),
    ("/decode", {"embeddings": [[0.0] * 3]}, "embeddings.0", "invalid_value"),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD_REQUESTS)
def test_bad_field_is_400_naming_it(
    client: TestClient, path: str, body: dict[str, Any], param: str, code: str
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == code


def test_default_max_sentences_stays_within_the_servers_limit(client: TestClient) -> None:
    """A request that does not name max_sentences is not refused for the server's default."""
    r = client.post("/generate", json={"prompt": PROMPT, **NO_EOS, **FAST})
    assert r.status_code == 200, r.text
    assert len(r.json()["sentences"]) == LIMIT
    r = client.post("/v1/completions", json={"prompt": PROMPT, **NO_EOS, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == LIMIT


def test_unreadable_bodies_are_400(client: TestClient) -> None:
    r = client.post(
        "/generate", content=b'{"prompt": "Hi.",', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400
    assert error_of(r)["param"] == "body" and error_of(r)["code"] == "json_invalid"
    r = client.post("/generate")
    assert r.status_code == 400
    assert error_of(r)["param"] == "body" and error_of(r)["code"] == "missing"
    r = client.post("/v1/completions", json=["Hi."])
    assert r.status_code == 400
    assert error_of(r)["param"] == "body"


def test_prompt_over_the_sentence_limit_is_400_and_never_queued(
    api: Callable[..., TestClient],
) -> None:
    c = api(max_prompt_sentences=2)
    r = c.post("/generate", json={"prompt": DOCUMENT, "max_sentences": 1, **FAST})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "prompt" and "3 sentences" in err["message"]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": DOCUMENT}]})
    assert r.status_code == 400 and error_of(r)["param"] == "prompt"
    text = c.get("/metrics").text
    # Refused before the queue: not a client cancellation, no prompt sentences prefilled.
    assert metric(text, "sonar_llm_cancelled_total") == 0
    assert metric(text, "sonar_llm_requests_finished_total", finish_reason="cancelled") == 0
    warm_up = 1  # the warm-up's "Hello world."
    assert metric(text, "sonar_llm_prompt_sentences_total") == warm_up
    # Two sentences are fine.
    r = c.post("/generate", json={"prompt": PROMPT, "max_sentences": 1, **FAST})
    assert r.status_code == 200


def test_wrong_model_on_v1_is_404(client: TestClient) -> None:
    for path, body in [
        ("/v1/completions", {"model": "gpt-4", "prompt": "Hi."}),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "Hi."}]},
        ),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 404
        err = error_of(r)
        assert err["type"] == "not_found_error"
        assert err["param"] == "model" and err["code"] == "model_not_found"
        assert "gpt-4" in err["message"]


def test_unknown_path_and_method_use_the_envelope(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    r = client.get("/generate")
    assert r.status_code == 405 and error_of(r)


def test_non_json_body_is_415(client: TestClient) -> None:
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = client.post("/generate", content=b"prompt=Hi.", headers={"Content-Type": ctype})
        assert r.status_code == 415, ctype
        err = error_of(r)
        assert err["param"] == "content-type" and err["code"] == "unsupported_media_type"
    ok = client.post(
        "/generate",
        content=b'{"prompt": "Hi.", "max_sentences": 1, "max_tokens": 24}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(api: Callable[..., TestClient]) -> None:
    c = api(max_body_bytes=2048)
    big = {"prompt": "Hello there. " * 400}
    r = c.post("/generate", json=big)  # with Content-Length
    assert r.status_code == 413
    err = error_of(r)
    assert err["type"] == "request_too_large" and err["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"Hello there. " * 10
        yield b'"}'

    r = c.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert error_of(r)["code"] == "body_too_large"
    small = c.post("/generate", json={"prompt": "Hi.", "max_sentences": 1, **FAST})
    assert small.status_code == 200


def test_api_key_guards_everything_but_health_and_metrics(
    api: Callable[..., TestClient],
) -> None:
    c = api(api_key=["key-one", "key-two"])
    gen = {"prompt": "Hi.", "max_sentences": 1, **FAST}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "key-on"}):
        for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/info")]:
            r = c.request(method, path, json=gen if method == "POST" else None, headers=headers)
            assert r.status_code == 401, (headers, path)
            err = error_of(r)
            assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/generate", json=gen, headers={"Authorization": "Bearer key-two"}).is_success
    assert c.post("/generate", json=gen, headers={"X-API-Key": "key-one"}).is_success
    assert c.get("/v1/models", headers={"authorization": "bearer key-one"}).is_success
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert c.get(path).status_code == 200, path


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    gen = {"prompt": "Hi.", "max_sentences": 1, **FAST}
    r = client.post("/generate", json=gen, headers={"X-Request-Id": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    assert r.json()["id"] == "trace-42.a:b"
    # Errors carry it too.
    r = client.post("/generate", json={"prompt": ""}, headers={"X-Request-Id": "trace-43"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-43"
    ids = {client.get("/health/live").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    # An id unsafe to log is replaced, not echoed.
    r = client.get("/health/live", headers={"X-Request-Id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_not_ready_is_503_with_retry_after(pipe: SonarLLMPipeline, tmp_path: Path) -> None:
    # Before bring-up (the lifespan has not run): loading.
    loading = TestClient(create_app(settings(), pipe=pipe))
    assert loading.get("/health/live").status_code == 200
    r = loading.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    assert r.headers["retry-after"]
    r = loading.post("/generate", json={"prompt": "Hi."})
    assert r.status_code == 503
    assert error_of(r)["code"] == "not_ready" and r.headers["retry-after"]
    # A model that cannot load: failed, and the reason is given.
    app = create_app(settings(model=str(tmp_path)))
    with TestClient(app) as c:
        wait_until(lambda: app.state.sonar.status == "failed", 60, "the load to fail")
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "checkpoint" in r.json()["detail"]
        assert c.get("/health/live").status_code == 200
        for path, body in [("/generate", {"prompt": "Hi."}), ("/embed", {"texts": ["Hi."]})]:
            r = c.post(path, json=body)
            assert r.status_code == 503 and r.headers["retry-after"]
            assert error_of(r)["code"] == "not_ready"
            assert "failed to load" in error_of(r)["message"]


def test_cors_preflight_from_the_allowed_origin(api: Callable[..., TestClient]) -> None:
    origin = "https://app.example.com"
    c = api(cors_origin=[origin], api_key=["secret"])
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    # Browsers send no credentials on a preflight: it must not need the API key.
    r = c.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = c.get("/v1/models", headers={"Origin": origin, "Authorization": "Bearer secret"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_a_body_without_content_type_is_415(api: Callable[..., TestClient]) -> None:
    client = api()
    response = client.post("/generate", content=b'{"prompt": "Hi."}', headers={"content-type": ""})
    assert response.status_code == 415
    assert error_of(response)["param"] == "content-type"


SEGMENT_TEXTS = [
    ("Dr. Smith arrived at 5 p.m. on Monday. He left. Nobody knew why", "eng_Latn"),
    ('"Where is it?" he asked. The U.S. team won.\n\nA new paragraph starts here.', "eng_Latn"),
    ("Hello there.", "eng_Latn"),
    ("Der Hund schläft. Die Katze läuft nach Hause!", "deu_Latn"),
]


@pytest.mark.parametrize("add_begin", [False, True])
def test_segment_is_what_generate_sees(
    api: Callable[..., TestClient],
    pipe: SonarLLMPipeline,
    monkeypatch: pytest.MonkeyPatch,
    add_begin: bool,
) -> None:
    import dataclasses

    from models.sentences import splitter_name

    monkeypatch.setattr(
        pipe.model, "config", dataclasses.replace(pipe.model.config, add_begin=add_begin)
    )
    c = api()
    for text, lang in SEGMENT_TEXTS:
        seg = c.post("/segment", json={"text": text, "lang": lang})
        assert seg.status_code == 200, seg.text
        body = seg.json()
        assert body["splitter"] == splitter_name(lang)
        assert (body["sentences"][0] == "Begin of text.") is add_begin
        gen = c.post(
            "/generate",
            json={
                "prompt": text,
                "source_lang": lang,
                "max_sentences": 1,
                "max_tokens": 8,
                "return_embeddings": True,
            },
        ).json()
        assert gen["prompt_sentences"] == body["sentences"]
        assert gen["usage"]["prompt_sentences"] == len(body["sentences"])
    assert len(c.post("/segment", json={"text": SEGMENT_TEXTS[1][0]}).json()["sentences"]) >= 3
    assert c.get("/info").json()["splitter"] == splitter_name("eng_Latn")
    for bad in (
        {"text": ""},
        {"text": "   "},
        {"text": "x", "lang": "xxx_Yyyy"},
        {"lang": "eng_Latn"},
    ):
        r = c.post("/segment", json=bad)
        assert r.status_code == 400, (bad, r.text)


def test_prompt_embeddings_continue_like_the_text_they_encode(
    client: TestClient, pipe: SonarLLMPipeline
) -> None:
    text = "The cat runs home. It is late. The moon is up."
    opts = {"max_sentences": 3, "max_tokens": 24, **NO_EOS, "return_embeddings": True}
    want = client.post("/generate", json={"prompt": text, **opts}).json()
    sentences = want["prompt_sentences"]
    vectors = client.post("/embed", json={"texts": sentences}).json()["embeddings"]
    only = client.post("/generate", json={"prompt_embeddings": vectors, **opts}).json()
    assert only["sentences"] == want["sentences"]
    assert only["usage"]["prompt_sentences"] == want["usage"]["prompt_sentences"] == 3
    assert only["prompt_sentences"] == []  # vectors have no text to list
    mixed = client.post(
        "/generate", json={"prompt": sentences[0], "prompt_embeddings": vectors[1:], **opts}
    ).json()
    assert mixed["sentences"] == want["sentences"]
    assert mixed["prompt_sentences"] == sentences[:1]
    # Round trip: the returned (re-encoded) vectors continue the text as the text does.
    first = client.post("/generate", json={"prompt": text, **opts, "max_sentences": 1}).json()
    again = client.post(
        "/generate",
        json={"prompt": text, "prompt_embeddings": first["embeddings"], **opts},
    ).json()
    assert again["sentences"][:2] == want["sentences"][1:3]
    single = list(
        LLM(pipe).stream(
            GenerationRequest(
                text,
                fast_options(
                    max_sentences=3, eos_threshold=1.0, decode=DecodeOptions(max_tokens=24)
                ),
                prompt_embeddings=torch.tensor(first["embeddings"]),
            )
        )
    )[-1]
    assert isinstance(single, FinalEvent) and single.sentences == again["sentences"]


def test_prompt_embeddings_are_checked(client: TestClient, pipe: SonarLLMPipeline) -> None:
    dim = pipe.model.config.embed_dim
    cases = [
        ({"prompt_embeddings": [[0.0] * (dim - 1)]}, "prompt_embeddings.0"),
        ({"prompt_embeddings": [[200.0] * dim]}, "prompt_embeddings"),
        ({"prompt_embeddings": []}, "prompt_embeddings"),
        ({"max_sentences": 1}, "prompt"),
    ]
    for body, param in cases:
        r = client.post("/generate", json=body)
        assert r.status_code == 400, (body, r.text)
        assert error_of(r)["param"] == param, (body, r.text)
    for route, body in (
        ("/v1/completions", {"prompt": "Hi."}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi."}]}),
    ):
        r = client.post(route, json={**body, "prompt_embeddings": [[0.0] * dim]})
        assert r.status_code == 400
        assert "prompt_embeddings" in r.text
