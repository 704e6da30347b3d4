"""One-request generation (the offline `LLM`) on the tiny bundle: reference semantics, stops,
options, bad input."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from helpers import FAST_DECODE, fast_options
from reference import reference_generate

from models.generate import (
    BEGIN_TEXT,
    GenerationError,
    summarization_instruction,
    summarization_prompt,
)
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.engine import LLM, FinalEvent, GenerationRequest, SentenceEvent

PROMPTS = [
    "Hello there. The cat runs home.",
    "A small dog sees the moon today.",
    "Dr. Smith arrived at 5 p.m. on Monday. He left. Nobody knew why",
]


def run(pipe: SonarLLMPipeline, prompt: str | list[str], **kw: object) -> FinalEvent:
    events = list(LLM(pipe).stream(prompt, fast_options(**kw)))
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert [e.text for e in events[:-1]] == final.sentences  # type: ignore[union-attr]
    assert [e.index for e in events[:-1]] == list(range(len(final.sentences)))  # type: ignore[union-attr]
    return final


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_cached_generation_equals_the_no_cache_reference(
    any_pipe: SonarLLMPipeline, prompt: str
) -> None:
    pipe = any_pipe
    opts = fast_options(max_sentences=5)
    final = run(pipe, prompt, max_sentences=5)
    ref_sentences, ref_reason = reference_generate(pipe, prompt, opts)
    assert final.sentences == ref_sentences
    assert final.finish_reason == ref_reason == "length"
    assert len(set(final.sentences)) > 1  # the tiny model's text depends on its context


def test_add_begin_prepends_the_begin_sentence_and_matches_reference(
    any_pipe: SonarLLMPipeline,
) -> None:
    pipe = any_pipe
    with_begin = run(pipe, PROMPTS[0], max_sentences=3, add_begin=True)
    without = run(pipe, PROMPTS[0], max_sentences=3, add_begin=False)
    assert with_begin.usage.prompt_sentences == without.usage.prompt_sentences + 1
    assert with_begin.sentences != without.sentences
    assert BEGIN_TEXT not in with_begin.sentences
    ref, _ = reference_generate(pipe, PROMPTS[0], fast_options(max_sentences=3, add_begin=True))
    assert with_begin.sentences == ref


def test_length_stop_gives_exactly_max_sentences(pipe: SonarLLMPipeline) -> None:
    final = run(pipe, PROMPTS[1], max_sentences=3)
    assert final.finish_reason == "length"
    assert len(final.sentences) == 3
    assert final.usage.generated_sentences == 3
    assert final.usage.decoded_tokens > 3
    assert final.usage.time_to_first_sentence is not None


def test_eos_stop_when_a_sentence_re_encodes_close_to_the_eos_text(
    pipe: SonarLLMPipeline,
) -> None:
    free = run(pipe, PROMPTS[1], max_sentences=4).sentences
    # Declare the third sentence the end marker: generation must stop right before it.
    stopped = run(pipe, PROMPTS[1], max_sentences=4, eos_text=free[2])
    assert stopped.finish_reason == "stop"
    assert free[2] not in stopped.sentences
    assert stopped.sentences == free[: len(stopped.sentences)]
    assert len(stopped.sentences) <= 2


def test_threshold_minus_one_stops_before_any_sentence(pipe: SonarLLMPipeline) -> None:
    final = run(pipe, PROMPTS[0], eos_threshold=-1.0)
    assert final.finish_reason == "stop"
    assert final.sentences == []


def test_sentences_stream_one_at_a_time(pipe: SonarLLMPipeline) -> None:
    request = GenerationRequest(PROMPTS[0], fast_options(max_sentences=3), return_embeddings=True)
    stream = LLM(pipe).stream(request)
    first = next(stream)
    assert isinstance(first, SentenceEvent) and first.index == 0
    assert first.embedding is not None and len(first.embedding) == pipe.codec.embed_dim
    rest = list(stream)
    assert isinstance(rest[-1], FinalEvent) and len(rest) == 3


def test_target_language_changes_the_decoder_language(pipe: SonarLLMPipeline) -> None:
    # The random decoder's language token weighs little (its row is damped, see models.tiny):
    # one prompt's text can come out the same in both languages, so look across the prompts.
    eng = [run(pipe, p, max_sentences=2).sentences for p in PROMPTS]
    fra = [run(pipe, p, max_sentences=2, target_lang="fra_Latn").sentences for p in PROMPTS]
    assert fra != eng


def test_seeded_sampling_is_reproducible(pipe: SonarLLMPipeline) -> None:
    sampling = DecodeOptions(max_tokens=40, temperature=1.0, top_p=0.9)
    a = run(pipe, PROMPTS[0], max_sentences=3, decode=sampling, seed=7)
    b = run(pipe, PROMPTS[0], max_sentences=3, decode=sampling, seed=7)
    c = run(pipe, PROMPTS[0], max_sentences=3, decode=sampling, seed=8)
    greedy = run(pipe, PROMPTS[0], max_sentences=3)
    assert a.sentences == b.sentences
    assert a.sentences != c.sentences
    assert a.sentences != greedy.sentences


def test_latent_temperature_with_seed_is_reproducible(pipe: SonarLLMPipeline) -> None:
    a = run(pipe, PROMPTS[2], max_sentences=3, latent_temperature=2.0, seed=1)
    b = run(pipe, PROMPTS[2], max_sentences=3, latent_temperature=2.0, seed=1)
    greedy = run(pipe, PROMPTS[2], max_sentences=3)
    assert a.sentences == b.sentences
    assert a.sentences != greedy.sentences
    # The global RNG is untouched by seeded requests.
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    run(pipe, PROMPTS[2], max_sentences=1, latent_temperature=2.0, seed=1)
    assert torch.equal(torch.rand(1), x)


def test_summarization_prompt_is_document_plus_instruction(pipe: SonarLLMPipeline) -> None:
    prompt = summarization_prompt("The cat runs. The dog sleeps. The sun sets.", 1)
    assert prompt == [
        "The cat runs.",
        "The dog sleeps.",
        "The sun sets.",
        "Text summarization in one sentence only.",
    ]
    assert summarization_instruction(3) == "Text summarization in three sentences only."
    final = run(pipe, prompt, max_sentences=1)
    assert final.usage.prompt_sentences == 4 and len(final.sentences) == 1


@pytest.mark.parametrize(
    ("prompt", "kwargs", "param"),
    [
        ("", {}, "prompt"),
        ("   \n\t ", {}, "prompt"),
        ([], {}, "prompt"),
        ("Hi.", {"source_lang": "xx_Latn"}, "source_lang"),
        ("Hi.", {"target_lang": "english"}, "target_lang"),
        ("Hi.", {"max_sentences": 0}, "max_sentences"),
        ("Hi.", {"max_sentences": -3}, "max_sentences"),
        ("Hi.", {"eos_threshold": 1.5}, "eos_threshold"),
        ("Hi.", {"eos_threshold": float("nan")}, "eos_threshold"),
        ("Hi.", {"eos_text": "  "}, "eos_text"),
        ("Hi.", {"latent_temperature": -1.0}, "latent_temperature"),
    ],
)
def test_bad_input_names_the_field(
    pipe: SonarLLMPipeline, prompt: str, kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(GenerationError) as err:
        list(LLM(pipe).stream(prompt, fast_options(**kwargs)))
    assert err.value.param == param


def test_decode_options_are_validated() -> None:
    for bad in (
        {"beam_size": 0},
        {"max_tokens": 2},
        {"temperature": -1},
        {"temperature": 1e-40},  # would overflow to NaN probabilities inside the decoder
        {"top_p": 0.0},
    ):
        with pytest.raises(GenerationError) as err:
            dataclasses.replace(FAST_DECODE, **bad)
        assert err.value.param == next(iter(bad))


def test_repetition_stop_ends_before_the_first_sentence_close_to_an_earlier_one(
    pipe: SonarLLMPipeline,
) -> None:
    request = GenerationRequest(PROMPTS[1], fast_options(max_sentences=5), return_embeddings=True)
    events = list(LLM(pipe).stream(request))
    free = [e for e in events if isinstance(e, SentenceEvent)]
    assert len(free) == 5
    assert all(e.embedding is not None for e in free)
    embs = [torch.tensor(e.embedding) for e in free]
    # The similarity of the third sentence with its nearest earlier one: used as the
    # threshold, generation stops there (or earlier, if the second already reached it).
    sims = [
        max(float(torch.cosine_similarity(embs[k], embs[j], dim=0)) for j in range(k))
        for k in range(1, 5)
    ]
    threshold = sims[1] - 1e-4
    first = next(k for k in range(1, 5) if sims[k - 1] >= threshold)
    stopped = run(pipe, PROMPTS[1], max_sentences=5, repetition_threshold=threshold)
    assert stopped.finish_reason == "repetition"
    assert stopped.sentences == [e.text for e in free[:first]]
    # Above every similarity: no stop, the output is the default one.
    off = run(pipe, PROMPTS[1], max_sentences=5, repetition_threshold=min(1.0, max(sims) + 1e-3))
    assert off.sentences == [e.text for e in free] and off.finish_reason == "length"
    # -1: every sentence after the first repeats it.
    minus_one = run(pipe, PROMPTS[1], max_sentences=5, repetition_threshold=-1.0)
    assert minus_one.sentences == [free[0].text]
    assert minus_one.finish_reason == "repetition"


def test_repetition_threshold_is_off_by_default_and_validated() -> None:
    assert fast_options().repetition_threshold is None
    with pytest.raises(GenerationError, match="repetition_threshold"):
        fast_options(repetition_threshold=1.5)


def test_half_precision_on_a_cpu_without_native_matmuls_is_named() -> None:
    from models.pipeline import slow_cpu_dtype

    avx2 = {"fpu", "sse2", "avx", "avx2", "fma"}
    why = slow_cpu_dtype(torch.bfloat16, avx2)
    assert why is not None and "avx512_bf16 or amx_bf16" in why and "float32" in why
    assert slow_cpu_dtype(torch.bfloat16, avx2 | {"amx_bf16"}) is None
    assert slow_cpu_dtype(torch.bfloat16, avx2 | {"avx512_bf16"}) is None
    assert slow_cpu_dtype(torch.float16, avx2 | {"avx512_bf16"}) is not None
    assert slow_cpu_dtype(torch.float32, avx2) is None
    assert slow_cpu_dtype(torch.bfloat16, None) is None  # flags unknown: no guess


def test_loading_bf16_on_this_cpu_warns_only_without_native_bf16(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from models.pipeline import cpu_flags

    with caplog.at_level(logging.WARNING, logger="sonar_llm.pipeline"):
        SonarLLMPipeline.load(str(bundle_dir), device="cpu", dtype="bfloat16")
    warned = [r for r in caplog.records if r.name == "sonar_llm.pipeline"]
    flags = cpu_flags()
    native = flags is None or bool(flags & {"avx512_bf16", "amx_bf16"})
    assert len(warned) == (0 if native else 1)
