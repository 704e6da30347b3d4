"""Text the model cannot encode is refused at the edge (400 naming the field), never in a batch.

JSON's `\\udXXX` escapes can spell a lone surrogate: valid JSON, a Python str, but no UTF-8 form,
and the SONAR tokenizer (C++) refuses it. Admitted, it failed the whole engine iteration: every
request batched with it ended with 500. Bodies are sent as raw JSON text, as a real client sends
them (the escape is in the bytes; the bytes are valid UTF-8).
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
from api_helpers import Live, error_of, metric, ready_client, settings, wait_until
from fastapi.testclient import TestClient
from pydantic import BaseModel, BeforeValidator

from models.pipeline import SonarLLMPipeline
from server.api import embedding_schemas, schemas
from server.api.app import create_app
from server.api.schemas import INVALID_TEXT, Text, _valid_unicode

JSON = {"Content-Type": "application/json"}
BAD = "\\udc80"  # in JSON text: one lone (low) surrogate
SMALL = '"max_sentences": 1, "max_tokens": 8'

# (path, raw JSON body, param, position of the surrogate in that field's text)
SURROGATES: list[tuple[str, str, str, int]] = [
    ("/generate", f'{{"prompt": "Hello {BAD} there.", {SMALL}}}', "prompt", 6),
    ("/generate", f'{{"prompt": "Hi.", "eos_text": "{BAD}", {SMALL}}}', "eos_text", 0),
    ("/generate", f'{{"prompt": "Hi.", "source_lang": "eng{BAD}"}}', "source_lang", 3),
    ("/generate", f'{{"prompt": "Hi.", "target_lang": "{BAD}"}}', "target_lang", 0),
    ("/summarize", f'{{"document": "The cat runs. {BAD}", {SMALL}}}', "document", 14),
    ("/summarize", f'{{"document": "Hi.", "instruction": "Sum{BAD}"}}', "instruction", 3),
    ("/v1/completions", f'{{"prompt": "Hello {BAD}"}}', "prompt", 6),
    ("/v1/completions", f'{{"prompt": ["ab{BAD}"]}}', "prompt.0", 2),
    ("/v1/completions", f'{{"prompt": "Hi.", "eos_text": "x{BAD}"}}', "eos_text", 1),
    ("/v1/completions", f'{{"prompt": "Hi.", "source_lang": "{BAD}"}}', "source_lang", 0),
    ("/v1/completions", f'{{"prompt": "Hi.", "model": "m{BAD}"}}', "model", 1),
    ("/v1/completions", f'{{"prompt": "Hi.", "user": "{BAD}"}}', "user", 0),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": "Twelve chars{BAD}"}}]}}',
        "messages.0.content",
        12,
    ),
    (
        "/v1/chat/completions",
        '{"messages": [{"role": "system", "content": "Be brief."}, '
        f'{{"role": "user", "content": [{{"type": "text", "text": "ok"}}, '
        f'{{"type": "text", "text": "a{BAD}"}}]}}]}}',
        "messages.1.content.1.text",
        1,
    ),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": "Hi.", "name": "{BAD}"}}]}}',
        "messages.0.name",
        0,
    ),
    (
        "/v1/chat/completions",
        f'{{"messages": [{{"role": "user", "content": "Hi."}}], "target_lang": "{BAD}"}}',
        "target_lang",
        0,
    ),
    ("/embed", f'{{"texts": ["One.", "Two.", "Thr{BAD}ee."]}}', "texts.2", 3),
    ("/embed", f'{{"texts": ["One."], "lang": "{BAD}"}}', "lang", 0),
    ("/decode", f'{{"embeddings": [[0.0]], "lang": "{BAD}"}}', "lang", 0),
]


@pytest.fixture(scope="module")
def client(pipe: SonarLLMPipeline) -> Iterator[TestClient]:
    with ready_client(create_app(settings(), pipe=pipe)) as c:
        yield c


@pytest.mark.parametrize(("path", "raw", "param", "position"), SURROGATES)
def test_lone_surrogate_is_400_naming_the_field(
    client: TestClient, path: str, raw: str, param: str, position: int
) -> None:
    r = client.post(path, content=raw.encode(), headers=JSON)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["code"] == INVALID_TEXT
    assert err["message"] == (
        f"{param}: contains a lone surrogate (\\udc80) at position {position}: "
        "text must be valid Unicode"
    )


def test_high_surrogate_and_surrogate_pairs(client: TestClient) -> None:
    """A high surrogate alone is refused; an escaped pair is one valid character."""
    r = client.post("/embed", content=b'{"texts": ["a\\ud83d b"]}', headers=JSON)
    assert r.status_code == 400 and error_of(r)["param"] == "texts.0"
    assert "(\\ud83d) at position 1" in error_of(r)["message"]
    r = client.post("/embed", content=b'{"texts": ["a \\ud83d\\ude00 b"]}', headers=JSON)
    assert r.status_code == 200, r.text


def test_nul_and_control_characters_are_accepted(client: TestClient) -> None:
    """SONAR's tokenizer encodes NUL and other controls: only what fails is refused."""
    r = client.post("/embed", json={"texts": ["a\x00b", "\x00", "tab\tand\x01\x7f"]})
    assert r.status_code == 200, r.text
    assert len(r.json()["embeddings"]) == 3
    r = client.post("/generate", json={"prompt": "Hello\x00 there.", "max_sentences": 1})
    assert r.status_code == 200, r.text


def _checked(metadata: Any) -> bool:
    return any(isinstance(m, BeforeValidator) and m.func is _valid_unicode for m in metadata)


def _unchecked_strings(annotation: Any, where: str, seen: set[type]) -> Iterator[str]:
    """Every place in a request type where a str is accepted without the Unicode check."""
    if typing.get_origin(annotation) is Annotated:
        base, *meta = typing.get_args(annotation)
        if base is str and not _checked(meta):
            yield where
        elif base is not str:
            yield from _unchecked_strings(base, where, seen)
        return
    if annotation is str:
        yield where
        return
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation in seen:
            return
        seen.add(annotation)
        for name, field in annotation.model_fields.items():
            at = f"{annotation.__name__}.{name}"
            # pydantic keeps a field's outer Annotated metadata apart from its annotation.
            if field.annotation is str:
                if not _checked(field.metadata):
                    yield at
            else:
                yield from _unchecked_strings(field.annotation, at, seen)
        return
    if typing.get_origin(annotation) is typing.Literal:
        return
    for arg in typing.get_args(annotation):
        yield from _unchecked_strings(arg, where, seen)


def test_every_text_field_of_every_route_is_checked() -> None:
    """A new request field cannot forget the check: every str is the schemas' `Text`."""
    # Each route's body model, as the published schema names it.
    refs = [
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for path in create_app(settings()).openapi()["paths"].values()
        for operation in path.values()
        if "requestBody" in operation
    ]
    modules = (schemas, embedding_schemas)
    names = [ref.rsplit("/", 1)[-1] for ref in refs]
    bodies = [next(getattr(m, n) for m in modules if hasattr(m, n)) for n in names]
    assert len(bodies) >= 7  # generate, summarize, embed, decode, completions, chat, embeddings
    seen: set[type] = set()
    unchecked = [w for body in bodies for w in _unchecked_strings(body, "", seen)]
    assert not unchecked, f"str fields without the Unicode check: {unchecked}"

    class Forgot(BaseModel):  # the walk does find a plain str: the check above is not vacuous
        ok: Text
        texts: list[Text] | None = None
        text: str
        nested: list[dict[str, str]] | None = None

    found = list(_unchecked_strings(Forgot, "", set()))
    assert found == ["Forgot.text", "Forgot.nested", "Forgot.nested"]  # dict: key and value


# ----- over real HTTP: a bad request never takes its batch mates down ----------------------
PROMPTS = [
    "Hello there.",
    "The cat runs home. It is late.",
    "A small dog sees the moon today.",
    "Mother reads a book. Father sings a song.",
    "Night falls. Stars appear.",
]
GEN = {"max_sentences": 2, "max_tokens": 24, "eos_threshold": 1.0}
CHAT = (
    '{"messages": [{"role": "user", "content": "The end is near.'
    + BAD
    + '"}], "max_sentences": 2, "max_tokens": 24}'
).encode()


def test_bad_chat_request_leaves_concurrent_generations_untouched(
    live: Callable[..., Live],
) -> None:
    server = live(encoder_cache_size=0)  # the batch encodes every text, the bad one too
    with server.client() as c:
        alone = []
        for p in PROMPTS:
            r = c.post("/generate", json={"prompt": p, **GEN})
            assert r.status_code == 200, r.text
            alone.append(r.json()["sentences"])

    gate = threading.Barrier(len(PROMPTS) + 1)
    replies: dict[int, httpx.Response] = {}
    opener: list[httpx.Response] = []

    def send(i: int) -> None:
        with server.client() as c:
            gate.wait(30)
            if i == len(PROMPTS):
                replies[i] = c.post("/v1/chat/completions", content=CHAT, headers=JSON)
            else:
                replies[i] = c.post("/generate", json={"prompt": PROMPTS[i], **GEN})

    def open_() -> None:
        with server.client() as c:
            opener.append(c.post("/generate", json={"prompt": "Begin.", **GEN, "max_sentences": 6}))

    # While the engine steps a first request, the six arrive and wait: they are admitted
    # (and their prompts encoded) together, in one iteration.
    first = threading.Thread(target=open_)
    first.start()
    engine = server.state.require_engine()
    wait_until(lambda: engine.num_running >= 1, what="the first request to run")
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS) + 1)]
    for t in threads:
        t.start()
    for t in [*threads, first]:
        t.join(120)
    assert len(replies) == len(PROMPTS) + 1
    assert opener[0].status_code == 200, opener[0].text

    for i, want in enumerate(alone):
        assert replies[i].status_code == 200, replies[i].text
        assert replies[i].json()["sentences"] == want, f"request {i}"
    chat = replies[len(PROMPTS)]
    assert chat.status_code == 400, chat.text
    assert error_of(chat)["param"] == "messages.0.content"
    assert error_of(chat)["code"] == INVALID_TEXT
    text = server.metrics()
    assert metric(text, "sonar_llm_requests_finished_total", finish_reason="error") == 0


# ----- strict types and the stream switch ----------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/generate", {"prompt": "Hi.", "stream": "yes"}, "stream"),
        ("/generate", {"prompt": "Hi.", "max_sentences": True}, "max_sentences"),
        ("/generate", {"prompt": "Hi.", "beam_size": 2.0}, "beam_size"),
        ("/generate", {"prompt": "Hi.", "eos_threshold": "0.5"}, "eos_threshold"),
        ("/v1/completions", {"prompt": "Hi.", "stream": 1}, "stream"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi."}], "n": "2"}, "n"),
        ("/decode", {"embeddings": [[0.0] * 64], "beam_size": True}, "beam_size"),
    ],
)
def test_types_are_strict(client: TestClient, path: str, body: dict[str, Any], param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_stream_in_the_body_wins_over_accept(client: TestClient) -> None:
    body = {"prompt": "The cat runs home.", "max_sentences": 1, "max_tokens": 16}
    sse = {"Accept": "text/event-stream"}
    r = client.post("/generate", json={**body, "stream": False}, headers=sse)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    r = client.post("/generate", json=body, headers=sse)  # no `stream`: Accept decides
    assert r.headers["content-type"].startswith("text/event-stream")


def test_decode_refuses_absurd_values(client: TestClient) -> None:
    dim = client.get("/info").json()["embed_dim"]
    r = client.post("/decode", json={"embeddings": [[1e19] * dim]})
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == "embeddings" and "magnitude" in error_of(r)["message"]
