"""POST /v1/embeddings through the official `openai` client and LangChain's OpenAIEmbeddings
(real uvicorn on 127.0.0.1): OpenAI's shapes, /embed's vectors."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_helpers import Live, error_of, start_live
from langchain_openai import OpenAIEmbeddings

from models.pipeline import SonarLLMPipeline

KEY = "sk-test-key"
TEXTS = ["The cat sleeps on the mat.", "Le chat dort sur le tapis.", "A dog barks."]


@pytest.fixture(scope="module")
def server(pipe: SonarLLMPipeline) -> Iterator[Live]:
    live = start_live(pipe, api_key=[KEY])
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def client(server: Live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60.0) as c:
        yield c


@pytest.fixture
def http(server: Live) -> Iterator[httpx.Client]:
    with server.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def embed(http: httpx.Client, texts: list[str], lang: str = "eng_Latn") -> list[list[float]]:
    r = http.post("/embed", json={"texts": texts, "lang": lang})
    assert r.status_code == 200, r.text
    return r.json()["embeddings"]  # type: ignore[no-any-return]


def test_floats_are_the_vectors_of_embed(client: openai.OpenAI, http: httpx.Client) -> None:
    model = client.models.list().data[0].id
    out = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    assert out.object == "list" and out.model == model
    assert [d.index for d in out.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in out.data)
    assert [d.embedding for d in out.data] == embed(http, TEXTS)
    dim = http.get("/info").json()["embed_dim"]
    assert all(len(d.embedding) == dim for d in out.data)
    assert out.usage.prompt_tokens == out.usage.total_tokens
    # Each text is at least its language token, one piece and </s>.
    assert out.usage.prompt_tokens >= 3 * len(TEXTS)


def test_base64_is_little_endian_float32_of_the_same_vectors(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    # The SDK asks for base64 unless told otherwise and decodes it itself.
    decoded = client.embeddings.create(model="sonar-llm-demo", input=TEXTS[0])
    raw = client.embeddings.with_raw_response.create(
        model="sonar-llm-demo", input=TEXTS[0], encoding_format="base64"
    )
    payload = raw.http_response.json()["data"][0]["embedding"]
    assert isinstance(payload, str)
    data = base64.b64decode(payload)
    floats = list(struct.unpack(f"<{len(data) // 4}f", data))
    expected = embed(http, [TEXTS[0]])[0]
    assert floats == expected
    assert decoded.data[0].embedding == expected


def test_source_lang_is_the_texts_language(client: openai.OpenAI, http: httpx.Client) -> None:
    out = client.embeddings.create(
        model="sonar-llm-demo",
        input=[TEXTS[1]],
        encoding_format="float",
        extra_body={"source_lang": "fra_Latn"},
    )
    assert out.data[0].embedding == embed(http, [TEXTS[1]], "fra_Latn")[0]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(
            model="sonar-llm-demo", input="x", extra_body={"source_lang": "xxx_Xxxx"}
        )
    assert e.value.body["param"] == "source_lang"  # type: ignore[index]


def test_dimensions_only_the_models_width(client: openai.OpenAI, http: httpx.Client) -> None:
    dim = http.get("/info").json()["embed_dim"]
    out = client.embeddings.create(model="sonar-llm-demo", input="Hi.", dimensions=dim)
    assert len(out.data[0].embedding) == dim
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="sonar-llm-demo", input="Hi.", dimensions=dim // 2)
    assert e.value.body["param"] == "dimensions"  # type: ignore[index]
    assert str(dim) in e.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize("tokens", [[15339, 1917], [[15339], [1917, 13]], 42])
def test_token_ids_are_refused_clearly(http: httpx.Client, tokens: object) -> None:
    r = http.post("/v1/embeddings", json={"input": tokens})
    assert r.status_code == 400
    err = error_of(r)
    assert err["param"] == "input" and err["code"] == "token_ids_unsupported"
    assert "check_embedding_ctx_length=False" in err["message"]


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="Hi.")


def test_langchain_openai_embeddings(server: Live, http: httpx.Client) -> None:
    # LangChain tokenizes with tiktoken by default and sends token ids; SONAR reads text.
    lc = OpenAIEmbeddings(
        model="sonar-llm-demo",
        base_url=f"{server.url}/v1",
        api_key=KEY,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    docs = lc.embed_documents(TEXTS)
    query = lc.embed_query(TEXTS[2])
    expected = embed(http, TEXTS)
    assert docs == expected
    assert query == expected[2]
