"""Sampled sentences decode inside the batched step: reproducible by seed whatever their batch
mates, top-k and top-p restrict what can be drawn, top-k 1 is greedy."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import embeddings

from models.decode_batch import decode_all
from models.pipeline import SonarLLMPipeline
from models.sampling import RowSampler, Sampling, draw_params, sample_tokens
from models.sonar_codec import DecodeOptions


def draws(lprobs: torch.Tensor, s: Sampling, n: int) -> collections.Counter[int]:
    """`n` draws for one row (its own stream), counted by token."""
    sampler = RowSampler(s)
    rows = lprobs.expand(n, -1)
    params = torch.from_numpy(draw_params([sampler] * n, lprobs.shape[-1]))
    return collections.Counter(sample_tokens(rows, params).tolist())


def test_top_k_and_top_p_restrict_the_support_and_pad_is_never_drawn() -> None:
    probs = torch.tensor([0.0, 0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # token 0 is PAD: banned
    lprobs = probs.log()
    everything = draws(lprobs, Sampling(1.0, seed=1), 20_000)
    assert set(everything) == {1, 2, 3, 4, 5, 6}
    for token, p in enumerate(probs.tolist()):
        assert everything[token] / 20_000 == pytest.approx(p, abs=0.015)
    assert set(draws(lprobs, Sampling(1.0, top_k=3, seed=2), 5_000)) == {1, 2, 3}
    # The nucleus: the fewest most likely tokens whose mass reaches p.
    assert set(draws(lprobs, Sampling(1.0, top_p=0.6, seed=3), 5_000)) == {1, 2}
    assert set(draws(lprobs, Sampling(1.0, top_p=0.3, seed=4), 1_000)) == {1}
    assert set(draws(lprobs, Sampling(1.0, top_k=1, seed=5), 1_000)) == {1}
    # A low temperature sharpens the distribution towards the most likely token.
    cold = draws(lprobs, Sampling(0.1, seed=6), 5_000)
    assert cold[1] / 5_000 > 0.95


def test_a_seeded_sentence_is_the_same_alone_and_in_any_batch(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    embs = embeddings(codec, n=12)
    sampled = DecodeOptions(temperature=1.0, top_p=0.95, seed=7, max_tokens=40)
    others = [
        DecodeOptions(beam_size=1 + i % 5, max_tokens=20 + 9 * (i % 3))
        if i % 2
        else DecodeOptions(temperature=0.5 + 0.2 * i, top_k=5 + i, seed=100 + i, max_tokens=30)
        for i in range(12)
    ]
    target = codec.beam_request("target", embs[0], "eng_Latn", sampled)
    alone = decode_all(codec.new_batch(codec.pool_for([target])), [target])[0]
    reqs = [codec.beam_request(i, embs[i], "eng_Latn", o) for i, o in enumerate(others)]
    batch = codec.new_batch(codec.pool_for([*reqs, target]))
    schedule = {0: reqs[:5], 1: [target], 3: reqs[5:]}  # mates join before and after it
    got = {}
    step = 0
    while step in schedule or len(batch):
        batch.add(schedule.get(step, []))
        result = batch.step()
        assert not result.failed
        got.update(result.finished)
        step += 1
    assert got["target"].tokens == alone.tokens
    assert got["target"].score == pytest.approx(alone.score, rel=1e-5)
    # Through the codec, beside beam-search rows and other sampled rows: the same text.
    mixed = codec.decode(embs[:6], "eng_Latn", [sampled, *others[1:6]])
    assert mixed[0] == codec.decode(embs[:1], "eng_Latn", sampled)[0]
    assert mixed[0].num_tokens == len(alone.tokens)


def test_seeds_and_temperature_change_the_text(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    emb = embeddings(codec, n=4)[:1].expand(6, -1)
    hot = [DecodeOptions(temperature=1.5, seed=s, max_tokens=30) for s in range(6)]
    texts = [d.text for d in codec.decode(emb, "eng_Latn", hot)]
    assert len(set(texts)) > 1
    # Unseeded rows draw fresh numbers each time.
    unseeded = DecodeOptions(temperature=1.5, max_tokens=30)
    assert len({d.text for d in codec.decode(emb, "eng_Latn", unseeded)}) > 1


@pytest.mark.parametrize("on_host", [True, False])
def test_top_k_1_is_greedy(pipe: SonarLLMPipeline, on_host: bool) -> None:
    # Both places a step's decisions can be made (the host: a CPU's; the device: a GPU's).
    codec = pipe.codec
    embs = embeddings(codec, n=16)
    beam1 = DecodeOptions(beam_size=1, max_tokens=48)
    greedy = codec.decode(embs, "eng_Latn", beam1, decide_on_host=on_host)
    for t in (0.3, 2.0):
        top1 = DecodeOptions(temperature=t, top_k=1, max_tokens=48)
        got = codec.decode(embs, "eng_Latn", top1, decide_on_host=on_host)
        assert [(d.text, d.num_tokens) for d in got] == [(d.text, d.num_tokens) for d in greedy]
        assert [d.score for d in got] == pytest.approx([d.score for d in greedy], rel=1e-5)
    assert len({d.num_tokens for d in greedy}) > 1  # some end early, some at the cap


def test_sampling_settings_out_of_range_are_refused(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    ok = codec.beam_request(0, embeddings(codec, n=2)[0], "eng_Latn", DecodeOptions())
    batch = codec.new_batch(codec.pool_for([ok]))
    for bad, why in [
        (Sampling(0.0), "temperature"),
        (Sampling(float("nan")), "temperature"),
        (Sampling(1.0, top_p=1.5), "top_p"),
        (Sampling(1.0, top_k=0), "top_k"),
    ]:
        with pytest.raises(ValueError, match=why):
            batch.add([ok.__class__(**{**ok.__dict__, "beam_size": 1, "sampling": bad})])
    with pytest.raises(ValueError, match="beam_size must be 1"):
        batch.add([ok.__class__(**{**ok.__dict__, "sampling": Sampling(1.0)})])
    assert len(batch) == 0
