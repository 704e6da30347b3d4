"""Engine v2: admission by memory, SONAR jobs and long prompts that never stall the streams, and
faults that stay with the request that caused them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from helpers import PROMPTS, collect, fast_options, options, single, submit

from models.generate import GenerationError
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions
from server.engine import DecodeRequest, EmbedRequest, Engine, EngineConfig, FinalEvent


def page_bytes(pipe: SonarLLMPipeline) -> int:
    probe = Engine(pipe, EngineConfig(cache_memory=1 << 20))
    return probe.blocks.page_bytes


@pytest.fixture
def make_engine(pipe: SonarLLMPipeline) -> Iterator[Callable[..., Engine]]:
    started: list[Engine] = []

    def make(**config: Any) -> Engine:
        eng = Engine(pipe, EngineConfig(**config))
        eng.start()
        started.append(eng)
        return eng

    yield make
    for eng in started:
        eng.stop()


def watch_pages(eng: Engine) -> list[int]:
    """Record the pool's used pages after every iteration (on the engine thread)."""
    seen: list[int] = []
    step = eng.step

    def recording_step() -> None:
        step()
        seen.append(eng.blocks.used_pages)
        assert eng.blocks.reserved <= eng.blocks.num_pages

    eng.step = recording_step  # type: ignore[method-assign]
    return seen


def test_a_small_budget_queues_requests_and_changes_no_sentence(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine]
) -> None:
    opts = [options(i % 6) for i in range(24)]
    prompts = [PROMPTS[i % 6] for i in range(24)]
    alone = [single(pipe, p, o) for p, o in zip(prompts[:6], opts[:6], strict=True)]
    expected = [alone[i % 6] for i in range(24)]
    embeddings = pipe.codec.encode(["A dog barks.", "The sun is hot today."], "eng_Latn")
    short = DecodeOptions(max_tokens=40)
    want_texts = [d.text for d in pipe.codec.decode(embeddings, "eng_Latn", short)]
    # Room for a few requests at a time: the others must wait for pages, not fail.
    eng = make_engine(max_running=32, cache_memory=40 * page_bytes(pipe))
    seen = watch_pages(eng)

    async def main() -> tuple[list[FinalEvent], FinalEvent]:
        streams = [await submit(eng, p, o) for p, o in zip(prompts, opts, strict=True)]
        job = await eng.submit(eng.prepare(DecodeRequest(embeddings, "eng_Latn", short)))
        finals = [(await collect(s))[1] for s in streams]
        return finals, await job.result()

    finals, decoded = asyncio.run(main())
    assert [f.sentences for f in finals] == [e.sentences for e in expected]
    assert [f.finish_reason for f in finals] == [e.finish_reason for e in expected]
    assert [d.text for d in decoded.result] == want_texts  # type: ignore[union-attr]
    assert max(seen) <= eng.blocks.num_pages
    assert (
        eng.registry.get_sample_value("sonar_llm_queue_time_seconds_sum") > 0
    )  # some waited for memory
    assert eng.blocks.used_pages == 0 and eng.blocks.reserved == 0


def test_a_request_that_could_never_fit_is_refused_at_submission(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine]
) -> None:
    eng = make_engine(cache_memory=20 * page_bytes(pipe))

    async def main() -> None:
        big_beam = fast_options(decode=DecodeOptions(beam_size=32, max_tokens=40))
        with pytest.raises(GenerationError) as err:
            await submit(eng, "Hello there.", big_beam)
        assert err.value.param == "beam_size"
        assert "cache memory" in str(err.value)
        with pytest.raises(GenerationError) as err:
            await eng.submit(
                eng.prepare(
                    DecodeRequest(
                        torch.zeros(3, pipe.codec.embed_dim),
                        "eng_Latn",
                        DecodeOptions(beam_size=32, max_tokens=256),
                    )
                )
            )
        assert err.value.param == "beam_size"

    asyncio.run(main())
    assert eng.num_waiting == 0
    assert eng.registry.get_sample_value("sonar_llm_rejected_total", {"reason": "too_large"}) == 2


def test_embed_and_decode_jobs_equal_the_codec_in_chunks(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine]
) -> None:
    texts = [f"Sentence number {i} is here." for i in range(40)]
    want = pipe.codec.encode(texts, "eng_Latn")
    eng = make_engine(max_prefill_sentences=7)

    async def main() -> tuple[FinalEvent, FinalEvent]:
        embedded = await (await eng.submit(eng.prepare(EmbedRequest(texts, "eng_Latn")))).result()
        rows = want[:6]
        decoded = await (
            await eng.submit(
                eng.prepare(DecodeRequest(rows, "eng_Latn", DecodeOptions(max_tokens=30)))
            )
        ).result()
        return embedded, decoded

    embedded, decoded = asyncio.run(main())
    assert embedded.finish_reason == "stop"
    torch.testing.assert_close(embedded.result, want.cpu(), atol=1e-5, rtol=0)  # type: ignore[arg-type]
    alone = pipe.codec.decode(want[:6], "eng_Latn", DecodeOptions(max_tokens=30))
    assert [d.text for d in decoded.result] == [d.text for d in alone]  # type: ignore[union-attr]


def test_a_long_prompt_is_prefilled_in_chunks_while_streams_go_on(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine]
) -> None:
    long_prompt = " ".join(f"Line {i} of the long text." for i in range(120))
    long_opts = fast_options(max_sentences=2)
    expected = single(pipe, long_prompt, long_opts)
    stream_opts = fast_options(max_sentences=6, eos_threshold=1.0)
    eng = make_engine(max_prefill_sentences=4)

    async def arrivals(stream: Any) -> tuple[list[float], FinalEvent]:
        times = []
        async for event in stream:
            if isinstance(event, FinalEvent):
                return times, event
            times.append(time.perf_counter())
        raise AssertionError("no final event")

    async def main() -> tuple[list[float], tuple[list[float], FinalEvent]]:
        streaming = await submit(eng, PROMPTS[1], stream_opts)
        await streaming.__anext__()  # the stream is running before the long prompt comes
        submitted = time.perf_counter()
        long = await submit(eng, long_prompt, long_opts)
        (stream_times, _), (long_times, final) = await asyncio.gather(
            arrivals(streaming), arrivals(long)
        )
        return [t for t in stream_times if t > submitted], (long_times, final)

    stream_times, (long_times, long_final) = asyncio.run(main())
    assert long_final.sentences == expected.sentences
    # The running stream emitted sentences while the 120-sentence prompt was being prefilled
    # (30 iterations of 4 sentences), not only after it.
    assert stream_times and stream_times[0] < long_times[0]


# ----- faults stay with their request ---------------------------------------------------------
CULPRIT = "Fault lives here."


@pytest.mark.parametrize("stage", ["encode", "prefill", "re-encode", "model step"])
def test_a_fault_at_any_stage_ends_only_its_request(
    stage: str,
    pipe: SonarLLMPipeline,
    make_engine: Callable[..., Engine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mates = [(PROMPTS[i], options(i)) for i in range(3)]
    expected = [single(pipe, p, o) for p, o in mates]
    culprit_opts = fast_options(max_sentences=2, eos_threshold=1.0)
    culprit = single(pipe, CULPRIT, culprit_opts)
    first_output = culprit.sentences[0]
    assert all(first_output not in e.sentences for e in expected), "pick another culprit"
    marker = pipe.codec.encode([CULPRIT], "eng_Latn")[0]
    reencoded = pipe.codec.encode([first_output], "eng_Latn")[0]
    encode, extend = pipe.codec.encode, pipe.model.extend
    armed = threading.Event()

    def faulty_encode(texts: list[str], lang: str) -> torch.Tensor:
        if armed.is_set():
            if stage == "encode" and CULPRIT in texts:
                raise RuntimeError("injected encoder fault")
            if stage == "re-encode" and first_output in texts:
                raise RuntimeError("injected encoder fault")
        return encode(texts, lang)

    def faulty_extend(cache: Any, keys: list[Any], chunks: list[torch.Tensor]) -> torch.Tensor:
        if armed.is_set():
            target = marker if stage == "prefill" else reencoded
            if stage in ("prefill", "model step") and any(
                torch.equal(row, target) for c in chunks for row in c
            ):
                raise RuntimeError("injected model fault")
        return extend(cache, keys, chunks)

    monkeypatch.setattr(pipe.codec, "encode", faulty_encode)
    monkeypatch.setattr(pipe.model, "extend", faulty_extend)
    eng = make_engine(max_running=16)

    async def main() -> tuple[FinalEvent, list[FinalEvent]]:
        armed.set()
        streams = [await submit(eng, CULPRIT, culprit_opts)]
        streams += [await submit(eng, p, o) for p, o in mates]
        finals = [(await collect(s))[1] for s in streams]
        return finals[0], finals[1:]

    bad, good = asyncio.run(main())
    assert bad.finish_reason == "error"
    assert stage in (bad.error or ""), bad.error
    assert [f.sentences for f in good] == [e.sentences for e in expected]
    assert all(f.finish_reason == e.finish_reason for f, e in zip(good, expected, strict=True))
    assert eng.alive
    assert eng.blocks.used_pages == 0 and eng.blocks.reserved == 0


def test_a_failing_sonar_job_ends_alone(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    marked = torch.zeros(2, pipe.codec.embed_dim)
    marked[:, 0] = 0.123456
    beam_request = pipe.codec.beam_request

    def faulty(key: Any, embedding: torch.Tensor, *args: Any) -> Any:
        if float(embedding.reshape(-1)[0]) == pytest.approx(0.123456):
            raise RuntimeError("injected decoder fault")
        return beam_request(key, embedding, *args)

    monkeypatch.setattr(pipe.codec, "beam_request", faulty)
    mates = [(PROMPTS[i], options(i)) for i in range(3)]
    expected = [single(pipe, p, o) for p, o in mates]
    eng = make_engine()

    async def main() -> tuple[FinalEvent, list[FinalEvent]]:
        job = await eng.submit(
            eng.prepare(DecodeRequest(marked, "eng_Latn", DecodeOptions(max_tokens=20)))
        )
        streams = [await submit(eng, p, o) for p, o in mates]
        return await job.result(), [(await collect(s))[1] for s in streams]

    bad, good = asyncio.run(main())
    assert bad.finish_reason == "error" and "injected decoder fault" in (bad.error or "")
    assert [f.sentences for f in good] == [e.sentences for e in expected]
    assert eng.blocks.used_pages == 0 and eng.blocks.reserved == 0


def test_absurd_embeddings_are_refused_at_submission(
    pipe: SonarLLMPipeline, make_engine: Callable[..., Engine]
) -> None:
    eng = make_engine()

    async def main() -> None:
        for value in (1e19, 1e3, float("nan")):
            with pytest.raises(GenerationError) as err:
                await eng.submit(
                    eng.prepare(
                        DecodeRequest(torch.full((1, pipe.codec.embed_dim), value), "eng_Latn")
                    )
                )
            assert err.value.param == "embeddings"

    asyncio.run(main())


# ----- the setting, over HTTP -----------------------------------------------------------------
def test_cache_memory_setting_takes_sizes_and_reaches_info(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.engine.memory import parse_bytes
    from server.settings import Settings

    assert parse_bytes("512MiB") == 512 * 1024**2
    assert parse_bytes("1.5 GiB") == int(1.5 * 1024**3)
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
    monkeypatch.setenv("SONAR_LLM_CACHE_MEMORY", "64MiB")
    assert Settings().cache_memory == 64 * 1024**2


def test_a_never_fitting_request_gets_400_naming_the_field(
    pipe: SonarLLMPipeline, api: Callable[..., Any]
) -> None:
    client = api(cache_memory=str(30 * page_bytes(pipe)))
    info = client.get("/info").json()["cache_memory"]
    assert info["pages"] == 30 and info["limit_bytes"] == 30 * info["page_bytes"]
    r = client.post(
        "/generate", json={"prompt": "Hello there.", "beam_size": 32, "max_tokens": 512}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "beam_size"
    assert "cache memory" in r.json()["error"]["message"]
    ok = client.post(
        "/generate",
        json={"prompt": "Hello there.", "max_sentences": 1, "max_tokens": 20, "beam_size": 2},
    )
    assert ok.status_code == 200, ok.text
