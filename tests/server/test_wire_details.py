"""What clients nobody here wrote send and expect: gzip bodies, OpenAI's no-op fields, HEAD
probes, the limits /info reports, and numbers float32 cannot hold (real uvicorn)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_helpers import FAST, Live, error_of, start_live

from models.pipeline import SonarLLMPipeline
from server.connections import default_max_connections

SEGMENT = {"text": "The cat runs home. It is late.", "lang": "eng_Latn"}
SMALL = {**FAST, "max_sentences": 1}


@pytest.fixture(scope="module")
def server(pipe: SonarLLMPipeline) -> Iterator[Live]:
    live = start_live(pipe, max_body_bytes=64 * 1024)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def http(server: Live) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def _post(http: httpx.Client, path: str, body: bytes, encoding: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    return http.post(path, content=body, headers=headers)


def test_a_gzip_body_is_decoded(http: httpx.Client) -> None:
    plain = http.post("/segment", json=SEGMENT)
    packed = _post(http, "/segment", gzip.compress(json.dumps(SEGMENT).encode()), "gzip")
    assert packed.status_code == plain.status_code == 200
    assert packed.json() == plain.json()


def test_a_gzip_bomb_is_refused_at_the_body_limit(http: httpx.Client) -> None:
    # 64 KiB compressed becomes 50 MB: refused once 64 KiB are decoded.
    bomb = gzip.compress(b'{"text": "' + b" " * 50_000_000 + b'"}')
    assert len(bomb) < 64 * 1024
    r = _post(http, "/segment", bomb, "gzip")
    assert r.status_code == 413
    assert error_of(r)["code"] == "body_too_large"
    assert "decompresses" in error_of(r)["message"]


def test_broken_gzip_and_other_codings(http: httpx.Client) -> None:
    r = _post(http, "/segment", b"not gzip at all", "gzip")
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_gzip"
    for coding in ("br", "deflate", "zstd", "gzip, br"):
        r = _post(http, "/segment", json.dumps(SEGMENT).encode(), coding)
        assert r.status_code == 415, coding
        assert error_of(r)["param"] == "content-encoding"
        assert coding.split(", ")[-1] in error_of(r)["message"]


def test_openai_store_false_and_metadata_are_accepted(server: Live) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        out = client.chat.completions.create(
            model="sonar-llm-demo",
            messages=[{"role": "user", "content": "Hello there."}],
            store=False,
            metadata={"team": "search"},
            extra_body=SMALL,
        )
        assert out.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="sonar-llm-demo",
                messages=[{"role": "user", "content": "Hello there."}],
                store=True,
                extra_body=SMALL,
            )
        assert e.value.body["param"] == "store"  # type: ignore[index]


def test_stream_options_need_a_stream(http: httpx.Client) -> None:
    body = {"prompt": "Hi.", "stream_options": {"include_usage": True}, **SMALL}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert error_of(r)["param"] == "stream_options"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert any(line == "data: [DONE]" for line in r.iter_lines())


@pytest.mark.parametrize("path", ["/metrics", "/info", "/v1/models", "/health"])
def test_head_answers_as_get(http: httpx.Client, path: str) -> None:
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_bare_health_is_readiness(http: httpx.Client, server: Live) -> None:
    assert http.get("/health").json() == http.get("/health/ready").json()
    server.state.status = "draining"
    try:
        assert http.get("/health").status_code == http.get("/health/ready").status_code == 503
    finally:
        server.state.status = "ok"


def test_info_shows_the_connection_cap_in_force(http: httpx.Client) -> None:
    limits = http.get("/info").json()["limits"]
    assert limits["max_connections"] == default_max_connections()
    assert isinstance(limits["body_timeout"], float)


def test_values_beyond_float32_are_named_so(http: httpx.Client) -> None:
    dim = http.get("/info").json()["embed_dim"]
    row = [0.0] * dim
    row[3] = 1e300
    r = http.post("/decode", json={"embeddings": [row]})
    assert r.status_code == 400
    assert error_of(r)["param"] == "embeddings.0"
    assert "float32" in error_of(r)["message"] and "finite" not in error_of(r)["message"]
    r = http.post("/generate", json={"prompt_embeddings": [row], **SMALL})
    assert r.status_code == 400
    assert error_of(r)["param"] == "prompt_embeddings.0"
