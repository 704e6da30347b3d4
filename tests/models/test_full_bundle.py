"""The full-size random bundle: its directly written tokenizer (fast) and, opt-in, the bundle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from models import tiny
from models.libsndfile import ensure_libsndfile
from server.cli import build_parser

SENTENCE = "Dr. Smith arrived at 5 p.m. with the quick brown fox; naïve café, 日本!"


def _load(path: Path, langs: list[str]) -> object:
    ensure_libsndfile()  # the loader is a plain function: no fairseq2 init needed
    from fairseq2.models.nllb import NllbTokenizerConfig, load_nllb_tokenizer

    return load_nllb_tokenizer(path, NllbTokenizerConfig(langs=langs, default_lang="eng_Latn"))


def test_written_sentencepiece_model_encodes_and_decodes_every_id(tmp_path: Path) -> None:
    """The full preset's tokenizer code path at 5,000 entries, loaded as the bundle loads it."""
    langs = tiny._sonar_langs()
    size = 5000
    tiny.write_sentencepiece_model(tmp_path / "t.model", size - tiny.nllb_added_symbols(len(langs)))
    tok: object = _load(tmp_path / "t.model", langs)
    vi = tok.vocab_info  # type: ignore[attr-defined]
    assert vi.size == size
    assert (vi.pad_idx, vi.unk_idx, vi.bos_idx, vi.eos_idx) == (0, 1, 2, 3)

    encoder = tok.create_encoder(lang="eng_Latn", mode="source")  # type: ignore[attr-defined]
    decoder = tok.create_decoder(skip_special_tokens=True)  # type: ignore[attr-defined]
    ids = encoder(SENTENCE)
    assert vi.unk_idx not in ids.tolist()  # byte fallback: nothing is unknown
    assert decoder(ids) == SENTENCE

    model = tok._model  # type: ignore[attr-defined]
    specials = {model.token_to_index(f"__{lang}__") for lang in langs}
    specials |= {vi.pad_idx, vi.bos_idx, vi.eos_idx, model.token_to_index("\u2581")}
    specials |= {
        model.token_to_index(t) for t in ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")
    }
    for i in range(size):
        text = decoder(torch.tensor([i]))
        assert isinstance(text, str)
        assert text or i in specials, f"id {i} decodes to nothing"
    rng = random.Random(0)
    for _ in range(100):
        assert isinstance(decoder(torch.tensor(rng.choices(range(size), k=30))), str)


def test_sentencepiece_model_size_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        tiny.write_sentencepiece_model(tmp_path / "t.model", 100)


def test_full_preset_sizes_and_cli_choices(capsys: pytest.CaptureFixture[str]) -> None:
    full = tiny.preset_sizes("full", "900m")
    assert (full.sonar_dim, full.sonar_layers, full.sonar_heads, full.sonar_ffn) == (
        1024,
        24,
        16,
        8192,
    )
    assert full.vocab_size == 256206
    assert (full.llm.hidden_size, full.llm.num_hidden_layers, full.llm.head_dim) == (1536, 17, 64)
    assert tiny.preset_sizes("full").llm == tiny.RELEASED_LLMS["100m"]
    cards = {c for p in tiny.PRESETS.values() for c in (p.encoder_card, p.decoder_card)}
    assert len(cards) == 2 * len(tiny.PRESETS)  # bundles of different presets load together
    with pytest.raises(ValueError, match="full preset"):
        tiny.preset_sizes("tiny", "100m")
    args = build_parser().parse_args(["tiny", "d", "--preset", "full", "--llm", "300m"])
    assert (args.preset, args.llm) == ("full", "300m")
    # What `sonar-llm tiny --help` offers is what the bundle builder knows.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["tiny", "--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert "--preset {" + ",".join(tiny.PRESETS) + "}" in shown
    assert "--llm {" + ",".join(tiny.RELEASED_LLMS) + "}" in shown


@pytest.mark.full
def test_full_bundle_loads_and_generates(full_bundle_dir: Path) -> None:
    from models.generate import GenerationOptions
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions
    from server.engine import LLM, FinalEvent, SentenceEvent

    pipe = SonarLLMPipeline.load(full_bundle_dir, device="cpu")
    assert pipe.codec.vocab_size == tiny.FULL_VOCAB
    opts = GenerationOptions(max_sentences=1, decode=DecodeOptions(max_tokens=16))
    events = list(LLM(pipe).stream("The cat runs home. It sees a dog.", opts))
    sentences = [e for e in events if isinstance(e, SentenceEvent)]
    assert isinstance(events[-1], FinalEvent)
    assert len(sentences) == 1 and sentences[0].text.strip()
