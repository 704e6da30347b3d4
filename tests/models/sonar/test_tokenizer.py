"""The native NLLB tokenizer gives fairseq2's ids and texts, string for string.

Two tokenizers: the tiny bundle's (trained, 506 entries, its card's languages) and one of the
released size (256,206 entries, written as a SentencePiece model, with the released card's
languages in the card's own order). For each, every card language in source and target mode
over generated strings: the tokenizer's own pieces in random order, language codes and control
symbol names, empty and whitespace-only strings, NBSP, emoji with ZWJ, NFD accents, control
characters and strings over the encoder's 512-token cap.
"""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from models import tiny
from models.sonar.cards import CardStore
from models.sonar.loading import load_tokenizer
from models.sonar.tokenizer import NllbTokenizer

FIXED = [
    "",
    " ",
    "   ",
    "\t\n",
    "\u00a0",
    "a\u00a0b",
    "Hello, world.",
    "👩‍👩‍👧‍👦 family 👍🏽",
    unicodedata.normalize("NFD", "naïve café Ångström"),
    "\x00\x01\x07 ctrl \x1b[0m",
    "__eng_Latn__ <pad> </s> <s> <unk> <MINED_DATA>",
    "日本語のテキスト。中文。한국어.",
    "word " * 600,  # over the encoder's cap
]


def _strings(pieces: list[str], langs: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED) + [f"__{lang}__" for lang in langs] + list(langs)
    while len(out) < n:
        k = rng.choice((1, 3, 8, 30, 700))
        words = [p.replace("\u2581", " ") for p in rng.choices(pieces, k=k)]
        sep = rng.choice(("", " ", "\u00a0"))
        out.append(sep.join(words))
    return out


def _reference(path: Path, langs: list[str]) -> Any:
    from fairseq2.models.nllb import NllbTokenizerConfig, load_nllb_tokenizer

    return load_nllb_tokenizer(path, NllbTokenizerConfig(langs=langs, default_lang="eng_Latn"))


def _released_langs() -> list[str]:
    card = CardStore.discover().card("text_sonar_basic_encoder")
    return list(card.get("tokenizer_config")["_set_"]["langs"])


@pytest.fixture(scope="module", params=["tiny", "released-size"])
def pair(
    request: pytest.FixtureRequest,
    bundle: tiny.Bundle,
    tmp_path_factory: pytest.TempPathFactory,
    fairseq2_reference: None,
) -> tuple[NllbTokenizer, Any, list[str]]:
    if request.param == "tiny":
        store = CardStore.discover([bundle.asset_dir])
        native = load_tokenizer(store, bundle.tokenizer)
        path = Path(store.card(bundle.tokenizer).uri("tokenizer").removeprefix("file://"))
        langs = native.lang_order
    else:
        langs = _released_langs()
        path = tmp_path_factory.mktemp("tok") / "released-size.model"
        tiny.write_sentencepiece_model(path, tiny.FULL_VOCAB - tiny.nllb_added_symbols(len(langs)))
        native = NllbTokenizer.load(path, langs, "eng_Latn")
    return native, _reference(path, langs), langs


def test_vocabulary_layout_is_fairseq2s(pair: tuple[NllbTokenizer, Any, list[str]]) -> None:
    native, ref, langs = pair
    vi = ref.vocab_info
    assert (native.vocab_size, native.pad_idx, native.unk_idx, native.bos_idx, native.eos_idx) == (
        vi.size,
        vi.pad_idx,
        vi.unk_idx,
        vi.bos_idx,
        vi.eos_idx,
    )
    for lang in langs:
        assert native.lang_idx(lang) == ref._model.token_to_index(f"__{lang}__")


def test_token_ids_equal_fairseq2s_in_every_language(
    pair: tuple[NllbTokenizer, Any, list[str]],
) -> None:
    native, ref, langs = pair
    pieces = [native._sp.id_to_piece(i) for i in range(native.vocab_size)]
    pieces = [p for p in pieces if not p.startswith("<")]
    texts = _strings(pieces, langs, 10_000, seed=len(langs))
    checked = 0
    for i, lang in enumerate(langs):
        # Every language sees the fixed strings; the generated ones are dealt out across them.
        mine = FIXED + texts[len(FIXED) + i :: len(langs)]
        src = native.source_ids(mine, lang)
        tgt = native.target_ids(mine, lang)
        ref_src = ref.create_encoder(lang=lang, mode="source")
        ref_tgt = ref.create_encoder(lang=lang, mode="target")
        for text, s, t in zip(mine, src, tgt, strict=True):
            assert s == ref_src(text).tolist(), (lang, text[:60])
            assert t == ref_tgt(text).tolist(), (lang, text[:60])
            checked += 1
        assert native.target_prefix(lang) == ref_tgt.prefix_indices.tolist()
    assert checked >= 10_000
    assert any(len(s) > 514 for s in native.source_ids(FIXED, "eng_Latn"))


def test_decoding_equals_fairseq2s(pair: tuple[NllbTokenizer, Any, list[str]]) -> None:
    native, ref, langs = pair
    decode = ref.create_decoder(skip_special_tokens=True)
    rng = random.Random(1)
    for n in range(3000):
        ids = rng.choices(range(native.vocab_size), k=rng.choice((0, 1, 5, 40)))
        if n % 3 == 0:  # what the decoder emits: a prefix, pieces, </s>
            ids = [*native.target_prefix(rng.choice(langs)), *ids, native.eos_idx]
        assert native.decode(ids) == decode(torch.tensor(ids, dtype=torch.long)), ids
    for text in FIXED:
        ids = native.target_ids([text], "eng_Latn")[0]
        assert native.decode(ids) == decode(torch.tensor(ids))


def test_batch_pads_and_cuts_as_the_pipeline(pair: tuple[NllbTokenizer, Any, list[str]]) -> None:
    native, _ref, _langs = pair
    texts = ["a b c", "", "word " * 600]
    ids, lengths = native.batch(texts, "fra_Latn", max_seq_len=514)
    full = native.source_ids(texts, "fra_Latn")
    assert lengths.tolist() == [len(full[0]), 2, 514]
    assert ids.shape == (3, 514)
    assert ids[1, 2:].eq(native.pad_idx).all()
    assert ids[2].tolist() == full[2][:514]  # cut like the pipeline: the final </s> is gone
    assert ids[2, -1].item() != native.eos_idx


def test_unknown_language_is_refused(bundle: tiny.Bundle) -> None:
    native = load_tokenizer(CardStore.discover([bundle.asset_dir]), bundle.tokenizer)
    with pytest.raises(ValueError, match="xxx_Latn"):
        native.source_ids(["hi"], "xxx_Latn")


def test_card_languages_are_the_released_cards(bundle: tiny.Bundle) -> None:
    cards = list(yaml.safe_load_all((bundle.asset_dir / "cards.yaml").read_text()))
    assert set(cards[0]["tokenizer_config"]["_set_"]["langs"]) == set(_released_langs())
