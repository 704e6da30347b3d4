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
    *text_chunks, usage_chunk = chunks  # OpenAI's shape: usage alone in a last chunk
    assert "".join(c.choices[0].text for c in text_chunks) == answer.choices[0].text
    reasons = [c.choices[0].finish_reason for c in text_chunks]
    assert reasons == [None] * (len(text_chunks) - 1) + [answer.choices[0].finish_reason]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 2 and usage_chunk.usage.prompt_tokens == 2
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
            model=model, messages=[{"role": "user", "content": PROMPT}], n=17
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


# ----- coverage: what OpenAI clients send, honoured or refused by name ----------------------
def test_models_retrieve(client: openai.OpenAI, model: str) -> None:
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_several_prompts_get_one_choice_each_in_order(client: openai.OpenAI, model: str) -> None:
    prompts = ["The cat runs home.", "A small dog sees the moon today.", "Why? Because."]
    alone = [
        client.completions.create(model=model, prompt=p, extra_body=EXTRA).choices[0].text
        for p in prompts
    ]
    out = client.completions.create(model=model, prompt=prompts, extra_body=EXTRA)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == alone
    assert out.usage is not None and out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == 1 + 1 + 2
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model=model, prompt=prompts, stream=True, extra_body=EXTRA
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == alone


def test_n_choices_are_independent_samples(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    # Deterministic settings (the defaults): n identical choices, as documented.
    same = client.chat.completions.create(model=model, messages=messages, n=2, extra_body=EXTRA)
    assert [c.index for c in same.choices] == [0, 1]
    assert same.choices[0].message.content == same.choices[1].message.content
    # Sampling with a seed: choice j uses seed + j, so each is reproducible alone.
    sampled = {**EXTRA, "latent_temperature": 1.0}
    out = client.chat.completions.create(
        model=model, messages=messages, n=3, seed=7, extra_body=sampled
    )
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1
    for j in range(3):
        one = client.chat.completions.create(
            model=model, messages=messages, seed=7 + j, extra_body=sampled
        )
        assert one.choices[0].message.content == texts[j]


def test_stop_cuts_the_text_and_ends_with_stop(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt=PROMPT, extra_body=EXTRA)
    text = full.choices[0].text
    words = text.split()
    assert len(words) >= 2, text
    stop = words[1]  # a string inside the first sentence
    out = client.completions.create(model=model, prompt=PROMPT, stop=[stop], extra_body=EXTRA)
    (choice,) = out.choices
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert text.startswith(choice.text)
    assert out.usage is not None and out.usage.completion_tokens <= 1


def test_usage_arrives_in_a_last_chunk_without_choices(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXTRA,
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 2
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("presence_penalty", 0.5),
        ("logit_bias", {"50256": -100}),
        ("some_future_field", 1),
    ],
)
def test_unsupported_fields_are_refused_by_name(
    client: openai.OpenAI, model: str, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            extra_body={**EXTRA, field: value},
        )
    assert e.value.param == field


def test_no_op_values_of_unsupported_fields_pass(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        tools=[],
        extra_body=EXTRA,
    )
    assert out.choices[0].message.content


def test_a_cut_request_does_not_claim_stop(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(
        model=model,
        prompt=PROMPT,
        extra_body={**EXTRA, "max_sentences": 200, "timeout": 0.3},
    )
    assert out.choices[0].finish_reason == "length"
