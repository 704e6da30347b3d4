"""The official `openai` Python client against the server (real uvicorn on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from api_helpers import Live, break_running_decodes, start_live

from models.pipeline import SonarLLMPipeline

KEY = "sk-test-key"
PROMPT = "The cat runs home. It is late."
# Sentence-level knobs travel as extra body fields; EOS never matches, so lengths are exact.
EXTRA = {"max_sentences": 2, "max_tokens": 30, "eos_threshold": 1.0}


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
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models_list(client: openai.OpenAI, server: Live) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.state.model_name]
    assert models.data[0].object == "model"


def test_completion(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, extra_body=EXTRA)
    assert out.object == "text_completion" and out.model == model
    (choice,) = out.choices
    assert choice.text
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 2
    assert out.usage.total_tokens == 4


def test_chat_completion(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You continue stories."},
            {"role": "user", "content": PROMPT},
        ],
        max_completion_tokens=30,
        extra_body={"max_sentences": 2, "eos_threshold": 1.0},
    )
    (choice,) = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert out.usage.prompt_tokens == 3  # the system sentence and the user's two
    assert out.usage.completion_tokens == 2


def test_streamed_completion_equals_the_answer(client: openai.OpenAI, model: str) -> None:
    answer = client.completions.create(model=model, prompt=PROMPT, extra_body=EXTRA)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXTRA,
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices[0].finish_reason == answer.choices[0].finish_reason
    assert last.usage is not None
    assert last.usage.completion_tokens == 2 and last.usage.prompt_tokens == 2
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_equals_the_answer(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 30,
        "extra_body": {"max_sentences": 2, "eos_threshold": 1.0},
    }
    answer = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # only with include_usage
    with_usage = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == 2


def test_wrong_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT, extra_body=EXTRA)
    assert e.value.status_code == 404
    assert e.value.param == "model" and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
        )


def test_bad_field_is_bad_request_naming_it(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, extra_body={"max_sentences": 0})
    assert e.value.status_code == 400
    assert e.value.param == "max_sentences"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], n=2
        )
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, top_p=0.5)
    assert e.value.param == "temperature"  # top_p needs sampling


def test_wrong_key_is_authentication_error(server: Live) -> None:
    for key in ("sk-wrong", KEY[:-1]):
        with (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0) as c,
            pytest.raises(openai.AuthenticationError) as e,
        ):
            c.models.list()
        assert e.value.status_code == 401
        assert e.value.code == "invalid_api_key"


def test_failure_inside_a_stream_raises(client: openai.OpenAI, model: str, server: Live) -> None:
    """An in-band error after the first chunk (a decode that fails for real) raises."""
    stream = client.completions.create(
        model=model, prompt=PROMPT, stream=True, extra_body={**EXTRA, "max_sentences": 50}
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].text
    break_running_decodes(server.state)
    with pytest.raises(openai.APIError) as e:
        list(chunks)
    assert "decode failed" in e.value.message
    assert e.value.code == "generation_error"
