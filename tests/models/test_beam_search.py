"""Our batched beam search gives fairseq2's sentences, whatever joins or leaves the batch."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import embeddings

from models import tiny
from models.beam_rules import DecodedSeq
from models.block_manager import BlockManager, page_bytes_for, pages_for
from models.decode_batch import BeamRequest, DecodeBatch, beam_pages, decode_all
from models.decoder_stack import SonarDecoderStack
from models.pipeline import SonarLLMPipeline
from models.sonar.decoder import UnsupportedDecoder, native_decoder
from models.sonar.native import SonarParts
from models.sonar_codec import DecodeOptions, SonarCodec

SETTINGS = [(5, 256), (1, 256), (2, 64), (5, 40), (4, 8), (5, 5), (3, 3)]


@pytest.fixture(scope="module")
def pipe(fairseq2_pipe: SonarLLMPipeline) -> SonarLLMPipeline:
    """These tests compare with fairseq2's own decoder and generators: the fairseq2 backend."""
    return fairseq2_pipe


@pytest.fixture(scope="module")
def small_codec(tmp_path_factory: pytest.TempPathFactory) -> SonarCodec:
    """The benchmark's larger SONAR shape (256-d, 4 layers, 8 heads), real files and cards."""
    sonar_dir: Path = tmp_path_factory.mktemp("small-sonar")
    tiny.build_sonar(sonar_dir, preset="small")
    small = tiny.PRESETS["small"]
    return SonarCodec.load(
        small.encoder_card,
        small.decoder_card,
        small.encoder_card,
        device="cpu",
        asset_dirs=[sonar_dir],
        backend="fairseq2",
    )


def decode_alone(
    codec: SonarCodec, reqs: list[BeamRequest], on_host: bool | None = None
) -> dict[object, DecodedSeq]:
    """Each request decoded in a batch of its own."""
    out = {}
    for r in reqs:
        batch = codec.new_batch(codec.pool_for([r]), decide_on_host=on_host)
        out[r.key] = decode_all(batch, [r])[0]
    return out


def assert_same(a: DecodedSeq, b: DecodedSeq) -> None:
    """Same tokens; the score may differ in its last bits (batched float arithmetic)."""
    assert a.tokens == b.tokens
    assert a.score == pytest.approx(b.score, rel=1e-5)


def assert_same_as_fairseq2(
    codec: SonarCodec, embs: torch.Tensor, opts: DecodeOptions, on_host: bool | None = None
) -> None:
    ours = codec.decode(embs, "eng_Latn", opts, decide_on_host=on_host)
    theirs = codec.decode(embs, "eng_Latn", opts, use_fairseq2=True)
    assert [(d.text, d.num_tokens) for d in ours] == [(d.text, d.num_tokens) for d in theirs]
    assert [d.score for d in ours] == pytest.approx([d.score for d in theirs], rel=1e-5)


@pytest.mark.parametrize(("beam", "max_tokens"), SETTINGS)
def test_equals_fairseq2_beam_search_on_the_tiny_decoder(
    pipe: SonarLLMPipeline, beam: int, max_tokens: int
) -> None:
    assert pipe.codec.decoder_stack is not None
    embs = embeddings(pipe.codec)
    assert_same_as_fairseq2(pipe.codec, embs, DecodeOptions(beam_size=beam, max_tokens=max_tokens))


@pytest.mark.parametrize(("beam", "max_tokens"), [(5, 256), (2, 40), (5, 6)])
def test_equals_fairseq2_beam_search_on_the_small_decoder(
    small_codec: SonarCodec, beam: int, max_tokens: int
) -> None:
    assert small_codec.decoder_stack is not None
    embs = embeddings(small_codec, n=24)
    assert_same_as_fairseq2(small_codec, embs, DecodeOptions(beam_size=beam, max_tokens=max_tokens))


@pytest.fixture(params=[True, False], ids=["host", "device"])
def on_host(request: pytest.FixtureRequest) -> bool:
    """Both places the step's decisions can be made: on the host (NumPy views, a CPU's path)
    and on the device (tensor operations and one packed read back, a GPU's path), run here."""
    return bool(request.param)


@pytest.mark.parametrize(("beam", "max_tokens"), [(5, 256), (2, 64), (4, 8), (3, 3)])
def test_both_decision_paths_equal_fairseq2(
    pipe: SonarLLMPipeline, on_host: bool, beam: int, max_tokens: int
) -> None:
    # By default a batch decides on the host exactly when its decoder is on the CPU.
    assert pipe.codec.new_batch(pipe.codec.pool_for([])).decide_on_host
    embs = embeddings(pipe.codec)
    opts = DecodeOptions(beam_size=beam, max_tokens=max_tokens)
    assert_same_as_fairseq2(pipe.codec, embs, opts, on_host)


def test_inputs_are_varied_enough_for_equality_to_mean_something(pipe: SonarLLMPipeline) -> None:
    lengths = [d.num_tokens for d in pipe.codec.decode(embeddings(pipe.codec), "eng_Latn")]
    cap = 2 + pipe.codec.embed_dim + 128 - 2  # fairseq2's bound for this embedding size
    assert min(lengths) < 10 and max(lengths) == cap
    assert len(set(lengths)) > 10


def test_rows_joining_and_leaving_mid_decode_change_nothing(
    pipe: SonarLLMPipeline, on_host: bool
) -> None:
    codec = pipe.codec
    embs = embeddings(codec, n=16)
    opts = [DecodeOptions(beam_size=1 + i % 5, max_tokens=20 + 13 * (i % 4)) for i in range(24)]
    reqs = [codec.beam_request(i, embs[i], "eng_Latn", o) for i, o in enumerate(opts)]
    alone = decode_alone(codec, reqs, on_host)

    batch = codec.new_batch(codec.pool_for(reqs), decide_on_host=on_host)
    got = {}
    cancelled = {3, 17}
    schedule = {0: reqs[:8], 2: reqs[8:10], 5: reqs[10:18], 9: reqs[18:]}
    step = 0
    while step in schedule or len(batch):
        batch.add(schedule.get(step, []))
        if step == 7:
            batch.remove(cancelled)
        result = batch.step()
        assert not result.failed
        got.update(result.finished)
        step += 1
    assert set(got) == set(alone) - cancelled
    for key, seq in got.items():
        assert_same(seq, alone[key])
    assert batch.num_rows == 0 and batch.cache_bytes() == 0


def test_a_nan_embedding_fails_only_its_own_row(pipe: SonarLLMPipeline, on_host: bool) -> None:
    codec = pipe.codec
    embs = embeddings(codec, n=4)
    bad = torch.full_like(embs[0], float("nan"))
    opts = DecodeOptions(max_tokens=30)
    good = [codec.beam_request(i, embs[i], "eng_Latn", opts) for i in range(4)]
    alone = decode_all(codec.new_batch(codec.pool_for(good), decide_on_host=on_host), good)
    joining = [*good[:2], codec.beam_request("bad", bad, "eng_Latn", opts), *good[2:]]
    batch = codec.new_batch(codec.pool_for(joining), decide_on_host=on_host)
    batch.add(joining)
    finished, failed = {}, []
    while len(batch):
        result = batch.step()
        finished.update(result.finished)
        failed += result.failed
    assert [k for k, _ in failed] == ["bad"] and "NaN" in failed[0][1]
    for i in range(4):
        assert_same(finished[i], alone[i])


def test_requests_it_cannot_decode_are_refused(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    emb = embeddings(codec, n=2)[0]
    ok = codec.beam_request(0, emb, "eng_Latn", DecodeOptions())
    batch = codec.new_batch(codec.pool_for([ok]))
    for bad, why in [
        (dict(max_seq_len=2), "no room"),
        (dict(max_seq_len=100_000), "beyond the decoder"),
        (dict(beam_size=0), "beam_size"),
        (dict(prefix=[]), "prefix"),
    ]:
        with pytest.raises(ValueError, match=why):
            batch.add([dataclasses.replace(ok, **bad)])  # type: ignore[arg-type]
    assert len(batch) == 0


def test_another_decoder_architecture_is_refused_by_the_codec(pipe: SonarLLMPipeline) -> None:
    from fairseq2.models.transformer import TransformerNormOrder

    decoder: Any = copy.deepcopy(pipe.codec.reference.model.decoder)
    decoder.decoder.layers[0].norm_order = TransformerNormOrder.POST
    with pytest.raises(UnsupportedDecoder, match="pre-norm"):
        SonarCodec(
            SonarParts(pipe.codec.text_encoder, decoder, pipe.codec.tokenizer),
            device=torch.device("cpu"),
            dtype=torch.float32,
        )


@pytest.mark.parametrize("n", [1, 8, 64])
def test_equals_fairseq2_at_batch_1_8_and_64(pipe: SonarLLMPipeline, n: int) -> None:
    embs = embeddings(pipe.codec, n=48)  # 72 rows: encoded sentences and points around them
    assert_same_as_fairseq2(pipe.codec, embs[:n], DecodeOptions(max_tokens=64))


def test_decode_batch_is_the_default_for_beam_search(pipe: SonarLLMPipeline) -> None:
    stack = pipe.codec.decoder_stack
    assert stack is not None
    embs = embeddings(pipe.codec, n=2)
    calls = []
    original = DecodeBatch.step

    def counting(self: DecodeBatch):  # type: ignore[no-untyped-def]
        calls.append(self.num_rows)
        return original(self)

    DecodeBatch.step = counting  # type: ignore[method-assign]
    try:
        pipe.codec.decode(embs, "eng_Latn", DecodeOptions(beam_size=3, max_tokens=10))
    finally:
        DecodeBatch.step = original  # type: ignore[method-assign]
    assert calls and max(calls) == 3 * len(embs)


class WatchedPool(BlockManager):
    """A page pool that remembers the most pages it ever had in use (transients included)."""

    peak = 0

    def alloc(self, n: int, owner: str) -> list[int]:
        pages = super().alloc(n, owner)
        self.peak = max(self.peak, self.used_pages)
        return pages


def test_pages_stay_within_pages_for_and_all_come_back(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    stack = codec.decoder_stack
    assert stack is not None
    # 3 positions a block: many block boundaries, forks inside blocks and at their ends.
    pool = WatchedPool(600, page_bytes_for([stack.bytes_per_position()], positions=3), "cpu")
    pool.buffer.fill_(255)  # NaN in every float: what the decoder reads must be its own writes
    other = pool.alloc(5, "llm")  # the SONAR-LLM's pages: the decoder leaves them alone
    embs = embeddings(codec, n=12)
    opts = [DecodeOptions(beam_size=1 + i % 5, max_tokens=9 + 7 * (i % 5)) for i in range(18)]
    reqs = [codec.beam_request(i, embs[i], "eng_Latn", o) for i, o in enumerate(opts)]
    alone = decode_alone(codec, reqs)

    batch = codec.new_batch(pool, owner="decoder")
    bp = batch.block_positions
    assert bp == 3
    bound = {r.key: beam_pages(r.beam_size, r.max_seq_len, bp) for r in reqs}
    schedule = {0: reqs[:6], 1: reqs[6:9], 4: reqs[9:14], 8: reqs[14:]}
    cancelled = {2, 11}
    got = {}
    step = 0
    while step in schedule or len(batch):
        batch.add(schedule.get(step, []))
        if step == 6:
            batch.remove(cancelled)
        limit = 5 + sum(bound[k] for k in batch.members())  # type: ignore[index]
        assert pool.used_pages <= limit
        pool.peak = pool.used_pages
        result = batch.step()
        assert pool.peak <= limit and pool.used_pages <= limit
        assert batch.cache_bytes() == pool.held_bytes("decoder")
        assert 0 <= batch.used_bytes() <= batch.cache_bytes()
        assert not result.failed
        got.update(result.finished)
        step += 1
    assert set(got) == set(alone) - cancelled
    for key, seq in got.items():  # the block size changes nothing
        assert_same(seq, alone[key])
    assert pool.used_pages == 5 and pool.held_pages("decoder") == 0
    assert batch.cache_bytes() == batch.used_bytes() == 0 and batch.num_rows == 0
    pool.release(other)


def test_pages_for_bounds_one_beam_at_its_longest(pipe: SonarLLMPipeline) -> None:
    stack = pipe.codec.decoder_stack
    assert stack is not None
    assert beam_pages(5, 17, 16) == 5  # 16 positions held at most: one block
    assert beam_pages(5, 18, 16) == 10
    assert beam_pages(1, 2, 16) == 1
    assert beam_pages(5, 18, 16) == pages_for(17, 16, rows=5)  # the block manager's rule
    small = BlockManager(4, 256, "cpu")
    if stack.bytes_per_position() > 256:
        with pytest.raises(ValueError, match="cannot hold one decoder position"):
            DecodeBatch(stack, pipe.codec.eos_idx, pipe.codec.pad_idx, small)


def test_a_beam_whose_forward_raises_fails_alone(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    assert codec.decoder_stack is not None
    stack = SonarDecoderStack(native_decoder(codec.reference.model.decoder))
    embs = embeddings(codec, n=4)
    marked = embs[0] * 50  # its cross-attention term stands out by its size
    with torch.inference_mode():
        normal = stack.cross_attention(embs).flatten(1).norm(dim=1).max().item()
        big = stack.cross_attention(marked[None]).flatten(1).norm(dim=1).item()
    assert big > 20 * normal
    threshold = (big * normal) ** 0.5
    forward = stack.forward
    calls = []

    def faulty(*args: torch.Tensor, **kw: object) -> torch.Tensor:
        cross = args[7]
        calls.append(cross.shape[0])
        if len(calls) > 4 and bool((cross.flatten(1).norm(dim=1) > threshold).any()):
            raise RuntimeError("injected fault")
        return forward(*args, **kw)  # type: ignore[arg-type]

    stack.forward = faulty  # type: ignore[method-assign]
    opts = DecodeOptions(max_tokens=30)
    good = [codec.beam_request(i, embs[i], "eng_Latn", opts) for i in range(4)]
    alone = decode_alone(codec, good)
    pool = BlockManager(200, page_bytes_for([stack.bytes_per_position()]), "cpu")
    batch = DecodeBatch(stack, codec.eos_idx, codec.pad_idx, pool)
    bad = codec.beam_request("bad", marked, "eng_Latn", opts)
    batch.add([*good[:2], bad, *good[2:]])
    finished, failed = {}, []
    while len(batch):
        result = batch.step()
        finished.update(result.finished)
        failed += result.failed
        if failed:
            assert "bad" not in batch.members()
    assert [k for k, _ in failed] == ["bad"] and "injected fault" in failed[0][1]
    assert set(finished) == {0, 1, 2, 3}
    for key, seq in finished.items():
        assert_same(seq, alone[key])
    assert pool.used_pages == 0


def test_row_topk_equals_topk_including_a_ragged_tail_and_nan() -> None:
    from models.beam_rules import row_topk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5003, generator=g).log_softmax(-1)
    x[1, -2:] += 30  # the best values in the short tail chunk
    x[2, 100:140] = x[2, 100]  # ties inside one chunk
    v, i = row_topk(x, 10, chunk=16)
    want = x.topk(10, dim=1)
    assert torch.equal(v, want.values) and torch.equal(
        i[[0, 1, 3, 4, 5]], want.indices[[0, 1, 3, 4, 5]]
    )
    x[4, 7] = float("nan")
    assert bool(row_topk(x, 10, chunk=16)[0][4, 0].isnan())


def test_chunked_candidates_equal_fairseq2(
    pipe: SonarLLMPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import beam_rules

    # Chunks of 4 tokens: the tiny vocabulary is then wide enough for the chunked top-k.
    monkeypatch.setattr(beam_rules, "TOPK_CHUNK", 4)
    assert pipe.codec.decoder_stack is not None
    assert pipe.codec.decoder_stack.vocab_size >= 4 * 4 * 10
    embs = embeddings(pipe.codec, n=16)
    assert_same_as_fairseq2(pipe.codec, embs, DecodeOptions(beam_size=5, max_tokens=40))
