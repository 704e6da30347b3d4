"""The engine batches requests without changing any request's sentences."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import PROMPTS, collect, fast_options, options, single, submit

from models.generate import GenerationError
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.engine import (
    Engine,
    EngineConfig,
    EngineDead,
    EngineOverloaded,
    FinalEvent,
    GenerationRequest,
    SentenceEvent,
)


@pytest.fixture
def engine(pipe: SonarLLMPipeline) -> AsyncIterator[Engine]:
    eng = Engine(pipe, EngineConfig(max_running=16, max_waiting=16))
    eng.start()
    yield eng  # type: ignore[misc]
    eng.stop()


def test_concurrent_mixed_requests_match_single_request_generation(
    any_pipe: SonarLLMPipeline,
) -> None:
    engine = Engine(any_pipe, EngineConfig(max_running=16, max_waiting=16))
    engine.start()
    try:
        _concurrent_mixed_requests_match(any_pipe, engine)
    finally:
        engine.stop()


def _concurrent_mixed_requests_match(pipe: SonarLLMPipeline, engine: Engine) -> None:
    expected = [single(pipe, p, options(i)) for i, p in enumerate(PROMPTS)]

    async def main() -> list[tuple[list[SentenceEvent], FinalEvent]]:
        first_sentence = asyncio.Event()

        async def noting_the_first(events: AsyncIterator[object]) -> AsyncIterator[object]:
            async for ev in events:
                first_sentence.set()
                yield ev

        async def one(i: int) -> tuple[list[SentenceEvent], FinalEvent]:
            if i % 2:  # these join while the others run: once a sentence has come out
                await first_sentence.wait()
            events = await submit(engine, PROMPTS[i], options(i))
            try:
                return await collect(noting_the_first(events))
            finally:
                first_sentence.set()  # a request that ends without a sentence lets them in too

        async def cancelled_neighbour() -> None:
            events = await submit(engine, PROMPTS[3], fast_options(max_sentences=50))
            async for ev in events:
                if isinstance(ev, SentenceEvent) and ev.index == 1:
                    break  # the client leaves mid-stream
            await events.aclose()  # type: ignore[attr-defined]

        results = await asyncio.gather(
            *(one(i) for i in range(len(PROMPTS))), cancelled_neighbour()
        )
        return results[:-1]  # type: ignore[return-value]

    results = asyncio.run(main())
    for i, ((events, final), want) in enumerate(zip(results, expected, strict=True)):
        assert final.sentences == want.sentences, f"request {i}"
        assert final.finish_reason == want.finish_reason
        assert [e.text for e in events] == final.sentences
        assert [e.index for e in events] == list(range(len(events)))
        assert final.usage.prompt_sentences == want.usage.prompt_sentences
        assert final.usage.decoded_tokens == want.usage.decoded_tokens
    # The decoder's batch held several sentences at once.
    sample = engine.registry.get_sample_value
    assert sample("sonar_llm_batch_size_sum") > sample("sonar_llm_batch_size_count")
    assert engine.num_running == 0 and engine.cache_bytes("used")["llm"] == 0
    assert engine.blocks.used_pages == 0 and engine.blocks.reserved == 0


def test_seeded_sampling_ignores_batch_mates(
    pipe: SonarLLMPipeline, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def whole_sentence(*_: object) -> None:
        raise AssertionError("a sentence was decoded on its own, outside the batched step")

    # Sampled sentences are rows of the decoder's batched step, never decoded one by one.
    monkeypatch.setattr(pipe.codec, "_run", whole_sentence)
    sampled = fast_options(
        max_sentences=3,
        seed=11,
        latent_temperature=1.5,
        decode=DecodeOptions(max_tokens=32, temperature=1.0, top_p=0.9),
    )
    alone = single(pipe, PROMPTS[1], sampled)

    async def main() -> FinalEvent:
        mates = [submit(engine, p, options(i)) for i, p in enumerate(PROMPTS[:5])]
        streams = await asyncio.gather(submit(engine, PROMPTS[1], sampled), *mates)
        results = await asyncio.gather(*(collect(s) for s in streams))
        return results[0][1]

    assert asyncio.run(main()).sentences == alone.sentences


def test_cancel_frees_the_request_and_its_cache(engine: Engine) -> None:
    async def main() -> None:
        events = await submit(engine, PROMPTS[7], fast_options(max_sentences=100))
        async for ev in events:
            assert isinstance(ev, SentenceEvent)
            assert engine.cache_bytes("used")["llm"] > 0 and engine.cache_bytes()["llm"] > 0
            break
        await events.aclose()  # type: ignore[attr-defined]
        for _ in range(200):  # wait (at most 2 s) for the engine to see the cancel
            if engine.num_running == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.num_running == 0
    assert engine.cache_bytes("used")["llm"] == 0
    assert engine.cache_bytes() == {"llm": 0, "decoder": 0}
    assert engine.registry.get_sample_value("sonar_llm_cancelled_total") == 1


def test_deadline_ends_a_request_with_timeout(engine: Engine) -> None:
    async def main() -> FinalEvent:
        stream = await submit(engine, PROMPTS[1], fast_options(max_sentences=200), timeout=0.3)
        return (await collect(stream))[1]

    final = asyncio.run(main())
    assert final.finish_reason == "timeout"
    assert len(final.sentences) < 200
    assert engine.num_running == 0


def test_full_queue_rejects_at_once(pipe: SonarLLMPipeline) -> None:
    eng = Engine(pipe, EngineConfig(max_running=1, max_waiting=1))
    eng.start()

    async def main() -> None:
        long = fast_options(max_sentences=30)
        first = await submit(eng, PROMPTS[0], long)
        second = await submit(eng, PROMPTS[1], long)
        third = None
        with pytest.raises(EngineOverloaded) as err:
            # the first may not be admitted yet: one more slot can be free
            third = await submit(eng, PROMPTS[2], long)
            await submit(eng, PROMPTS[3], long)
        assert err.value.retry_after > 0
        for s in (first, second, third):
            if s is not None:
                await s.aclose()  # type: ignore[attr-defined]

    try:
        asyncio.run(main())
        assert (
            eng.registry.get_sample_value("sonar_llm_rejected_total", {"reason": "queue_full"}) == 1
        )
    finally:
        eng.stop()


def test_bad_requests_fail_at_submission(engine: Engine) -> None:
    async def main() -> None:
        with pytest.raises(GenerationError) as err:
            await submit(engine, "   ", fast_options())
        assert err.value.param == "prompt"
        with pytest.raises(GenerationError) as err:
            await submit(engine, "Hi.", fast_options(), timeout=0)
        assert err.value.param == "timeout"

    asyncio.run(main())
    assert engine.num_waiting == 0


def test_submit_takes_only_prepared_work(engine: Engine) -> None:
    """A request goes through `Engine.prepare` first; handed to `submit` as it is, it is refused
    with a message saying so, and nothing is queued."""
    request = GenerationRequest("Hello there.", fast_options())

    async def main() -> FinalEvent:
        with pytest.raises(TypeError, match="prepare"):
            await engine.submit(request)  # type: ignore[arg-type]
        assert engine.num_waiting == 0 and not engine.has_work
        return (await collect(await engine.submit(engine.prepare(request))))[1]

    final, want = asyncio.run(main()), single(engine.pipe, "Hello there.", fast_options())
    assert (final.sentences, final.finish_reason) == (want.sentences, want.finish_reason)


def test_a_failing_decode_ends_only_its_request(pipe: SonarLLMPipeline, engine: Engine) -> None:
    # A decoder bound fairseq2 refuses (validation normally stops it; forced past it here).
    bad_decode = DecodeOptions(max_tokens=40)
    object.__setattr__(bad_decode, "max_tokens", 1)
    broken = fast_options(max_sentences=3, decode=bad_decode)
    expected = [single(pipe, p, options(i)) for i, p in enumerate(PROMPTS[:4])]

    async def main() -> list[FinalEvent]:
        streams = [await submit(engine, PROMPTS[5], broken)]
        streams += [await submit(engine, p, options(i)) for i, p in enumerate(PROMPTS[:4])]
        return [(await collect(s))[1] for s in streams]

    finals = asyncio.run(main())
    assert finals[0].finish_reason == "error" and "decode" in (finals[0].error or "")
    assert [f.sentences for f in finals[1:]] == [e.sentences for e in expected]
    assert engine.alive


def test_repeated_prompts_hit_the_encoder_cache(engine: Engine) -> None:
    async def main() -> None:
        for _ in range(2):
            await collect(await submit(engine, PROMPTS[7], fast_options(max_sentences=1)))

    cache = engine.runner.encoder_cache
    misses_before = cache.misses
    asyncio.run(main())
    assert cache.hits >= 5  # the second run's five prompt sentences
    assert cache.misses - misses_before <= 5 + 2


def test_prefill_budget_admits_long_prompts_over_several_iterations(
    pipe: SonarLLMPipeline,
) -> None:
    eng = Engine(pipe, EngineConfig(max_running=8, max_prefill_sentences=5))
    eng.start()
    prompts = [PROMPTS[3], PROMPTS[7], PROMPTS[1]]  # 7, 5 and 3 sentences
    expected = [single(pipe, p, fast_options(max_sentences=2)) for p in prompts]

    async def main() -> list[FinalEvent]:
        streams = [await submit(eng, p, fast_options(max_sentences=2)) for p in prompts]
        return [(await collect(s))[1] for s in streams]

    try:
        finals = asyncio.run(main())
    finally:
        eng.stop()
    assert [f.sentences for f in finals] == [e.sentences for e in expected]
    assert eng.registry.get_sample_value("sonar_llm_queue_time_seconds_sum") > 0


def test_stopped_engine_refuses_and_ends_pending_requests(pipe: SonarLLMPipeline) -> None:
    eng = Engine(pipe, EngineConfig())
    eng.start()

    async def main() -> FinalEvent:
        stream = await submit(eng, PROMPTS[7], fast_options(max_sentences=500))
        assert isinstance(await anext(stream), SentenceEvent)  # it is running
        eng.stop()
        final = (await collect(stream))[1]
        with pytest.raises(EngineDead):
            await submit(eng, PROMPTS[0], fast_options())
        return final

    final = asyncio.run(main())
    assert final.finish_reason == "cancelled"
    assert not eng.alive


def test_short_sentences_do_not_wait_for_a_long_one_beside_them(
    pipe: SonarLLMPipeline, engine: Engine
) -> None:
    # A request whose first sentence runs to the decoder's length cap, beside one whose
    # sentences end after a token: the decoder batches at token level, so the short request
    # completes all its sentences while the long sentence is still being decoded.
    long_opts = fast_options(max_sentences=1, decode=DecodeOptions(max_tokens=256))
    long_prompt = next(
        p
        for p in PROMPTS
        if single(pipe, p, long_opts).usage.decoded_tokens >= 100  # type: ignore[operator]
    )
    short_opts = fast_options(max_sentences=3, decode=DecodeOptions(max_tokens=3))

    async def main() -> tuple[list[float], list[float]]:
        long_stream = await submit(engine, long_prompt, long_opts)
        short_stream = await submit(engine, PROMPTS[0], short_opts)
        (long_events, long_final), (short_events, _) = await asyncio.gather(
            collect(long_stream), collect(short_stream)
        )
        assert long_final.finish_reason == "length" and len(short_events) == 3
        return [e.elapsed for e in long_events], [e.elapsed for e in short_events]

    long_times, short_times = asyncio.run(main())
    assert max(short_times) < long_times[0]


def test_repetition_stop_in_the_engine_matches_single_request_generation(
    pipe: SonarLLMPipeline, engine: Engine
) -> None:
    thresholds = [None, -1.0, 0.5, 0.8, 0.9, 0.95]
    opts = [fast_options(max_sentences=5, repetition_threshold=t) for t in thresholds]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(opts))]
    expected = [single(pipe, p, o) for p, o in zip(prompts, opts, strict=True)]
    assert any(e.finish_reason == "repetition" for e in expected)
    assert expected[0].finish_reason == "length"

    async def main() -> list[tuple[list[SentenceEvent], FinalEvent]]:
        streams = [await submit(engine, p, o) for p, o in zip(prompts, opts, strict=True)]
        return await asyncio.gather(*(collect(s) for s in streams))

    for (events, final), want in zip(asyncio.run(main()), expected, strict=True):
        assert final.sentences == want.sentences
        assert [e.text for e in events] == want.sentences
        assert final.finish_reason == want.finish_reason
    stops = sum(e.finish_reason == "repetition" for e in expected)
    assert engine.registry.get_sample_value("sonar_llm_repetition_stops_total") == stops


def test_prompt_embeddings_prefill_in_chunks_like_generate(pipe: SonarLLMPipeline) -> None:
    import torch

    from server.engine import GenerationRequest

    vectors = pipe.codec.encode(["It is late.", "The moon is up.", "A bird sleeps."], "eng_Latn")
    opts = fast_options(max_sentences=3, eos_threshold=1.0)
    text = "The cat runs home. Night falls."
    want = [e for e in generate_all(pipe, text, opts, vectors)][-1]
    only = [e for e in generate_all(pipe, None, opts, vectors)][-1]
    # Chunks of 2 cross the text/vector boundary and the vectors' middle.
    eng = Engine(pipe, EngineConfig(max_running=4, max_waiting=4, max_prefill_sentences=2))
    eng.start()
    try:

        async def main() -> list[tuple[list[SentenceEvent], FinalEvent]]:
            streams = [
                await eng.submit(eng.prepare(GenerationRequest(p, opts, prompt_embeddings=v)))
                for p, v in ((text, vectors), (None, vectors), (text, torch.zeros(2, 3)))
                if v.shape[1] == vectors.shape[1]
            ]
            return await asyncio.gather(*(collect(s) for s in streams))

        (_, a), (_, b) = asyncio.run(main())
        assert a.sentences == want.sentences and a.usage.prompt_sentences == 5
        assert b.sentences == only.sentences and b.usage.prompt_sentences == 3
        with pytest.raises(GenerationError, match="rows of"):
            asyncio.run(
                eng.submit(
                    eng.prepare(GenerationRequest(text, opts, prompt_embeddings=torch.zeros(2, 3)))
                )
            )
    finally:
        eng.stop()


def generate_all(pipe: SonarLLMPipeline, prompt: str | None, opts, vectors):  # type: ignore[no-untyped-def]
    from server.engine import LLM, GenerationRequest

    return list(LLM(pipe).stream(GenerationRequest(prompt, opts, prompt_embeddings=vectors)))
