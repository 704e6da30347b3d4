"""Tests for models.sentences: Punkt sentence splitting with and without ``punkt_tab``."""

from pathlib import Path

import nltk
import pytest
from helpers import install_fake_punkt_tab as _install_fake_punkt_tab

from models.sentences import (
    PUNKT_LANGUAGES,
    SentenceSplitter,
    punkt_language,
    punkt_tab_available,
    split_sentences,
)


@pytest.fixture(scope="module")
def english() -> SentenceSplitter:
    """The built-in fallback parameters, whether or not punkt_tab is installed here."""
    splitter = SentenceSplitter("eng_Latn", use_punkt_tab=False)
    assert not splitter.uses_punkt_tab
    return splitter


def test_abbreviations_and_times(english: SentenceSplitter) -> None:
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left."
    assert english.split(text) == ["Dr. Smith arrived at 5 p.m. on Monday.", "He left."]


def test_decimal_number(english: SentenceSplitter) -> None:
    sentences = english.split("The price rose 3.5 percent. Analysts were surprised.")
    assert sentences == ["The price rose 3.5 percent.", "Analysts were surprised."]


def test_dotted_acronym_before_lowercase(english: SentenceSplitter) -> None:
    sentences = english.split("The U.S. economy grew. Europe did not.")
    assert sentences == ["The U.S. economy grew.", "Europe did not."]


def test_exclamation_in_quotes_with_attribution(english: SentenceSplitter) -> None:
    # As trained Punkt (and so the reference) splits it: the model saw this text cut in three.
    text = '"Stop!" she said. He stopped.'
    assert english.split(text) == ['"Stop!"', "she said.", "He stopped."]
    # Opt-in: the lower-case continuation is merged back.
    merging = SentenceSplitter("eng_Latn", use_punkt_tab=False, merge_quote_continuations=True)
    assert merging.split(text) == ['"Stop!" she said.', "He stopped."]
    assert merging.split('"Why?" He left.') == ['"Why?"', "He left."]


@pytest.mark.parametrize("quote", ['"', "\u201d"], ids=["ascii", "curly"])
def test_closing_quote_stays_with_its_sentence(english: SentenceSplitter, quote: str) -> None:
    opening = '"' if quote == '"' else "\u201c"
    sentences = english.split(f"He said {opening}hello.{quote} Then he left.")
    assert sentences == [f"He said {opening}hello.{quote}", "Then he left."]


def test_ellipsis(english: SentenceSplitter) -> None:
    sentences = english.split("Wait... what happened? Nobody knows.")
    assert sentences[-1] == "Nobody knows."
    assert "..." not in sentences
    assert all(sentence.strip(". ") for sentence in sentences)
    assert sentences == ["Wait... what happened?", "Nobody knows."]


def test_missing_final_punctuation(english: SentenceSplitter) -> None:
    assert english.split("This is one. This has no end") == ["This is one.", "This has no end"]


def test_question_and_exclamation(english: SentenceSplitter) -> None:
    assert english.split("Really? Yes! Okay.") == ["Really?", "Yes!", "Okay."]


def test_latin_abbreviations_split_like_trained_punkt(english: SentenceSplitter) -> None:
    # Trained English Punkt does not know "e.g.", "i.e." or "etc." and cuts after them; the
    # fallback does the same on purpose (it is what SONAR-LLM's training text looked like).
    assert english.split("Use tools, e.g. hammers. Then rest.") == [
        "Use tools, e.g.",
        "hammers.",
        "Then rest.",
    ]
    assert english.split("Bring one, i.e. the red one. Go.") == [
        "Bring one, i.e.",
        "the red one.",
        "Go.",
    ]


def test_abbreviation_ending_a_sentence(english: SentenceSplitter) -> None:
    # A capitalised frequent sentence starter after an abbreviation begins a new sentence.
    assert english.split("I woke at 7 a.m. The sun rose.") == ["I woke at 7 a.m.", "The sun rose."]
    assert english.split("She works at Acme Inc. The office is new.") == [
        "She works at Acme Inc.",
        "The office is new.",
    ]
    # "She", "We", "Then" are no such starters for trained Punkt: it keeps these together.
    assert english.split("She works at Acme Inc. She likes it.") == [
        "She works at Acme Inc. She likes it."
    ]
    assert english.split("We met at 10 a.m. Then we left.") == ["We met at 10 a.m. Then we left."]


def test_us_news_abbreviations(english: SentenceSplitter) -> None:
    text = "Mr. Jones of Seattle, Wash., met Sen. Smith on Jan. 5 in Washington, D.C. on Tuesday."
    assert english.split(text) == [text]
    assert english.split("It dates from c. 1100 and was restored. It is old.") == [
        "It dates from c. 1100 and was restored.",
        "It is old.",
    ]


def test_initials(english: SentenceSplitter) -> None:
    assert english.split("John F. Kennedy spoke. We listened.") == [
        "John F. Kennedy spoke.",
        "We listened.",
    ]


@pytest.mark.parametrize("text", ["", " ", "\n\n", " \t\n  \r\n "])
def test_blank_text(english: SentenceSplitter, text: str) -> None:
    assert english.split(text) == []


def test_sentences_are_stripped(english: SentenceSplitter) -> None:
    assert english.split("   First one.    Second one.   ") == ["First one.", "Second one."]


def test_blank_line_is_a_boundary_only_when_asked(english: SentenceSplitter) -> None:
    text = "A heading\n\nThe body starts here. It goes on\n   \nLast paragraph"
    # Punkt (the reference) knows nothing of lines: only the punctuation cuts.
    assert english.split(text) == [
        "A heading\n\nThe body starts here.",
        "It goes on\n   \nLast paragraph",
    ]
    paragraphs = SentenceSplitter("eng_Latn", use_punkt_tab=False, paragraph_breaks=True)
    assert paragraphs.split(text) == [
        "A heading",
        "The body starts here.",
        "It goes on",
        "Last paragraph",
    ]


def test_single_newline_is_folded_only_when_asked(english: SentenceSplitter) -> None:
    text = "This sentence is\nwrapped over\r\n  three lines. Next one."
    assert english.split(text) == ["This sentence is\nwrapped over\r\n  three lines.", "Next one."]
    paragraphs = SentenceSplitter("eng_Latn", use_punkt_tab=False, paragraph_breaks=True)
    assert paragraphs.split(text) == ["This sentence is wrapped over three lines.", "Next one."]


def test_french() -> None:
    splitter = SentenceSplitter("fra_Latn", use_punkt_tab=False)
    assert splitter.language == "french"
    assert splitter.split("M. Dupont est arrivé. Il est parti.") == [
        "M. Dupont est arrivé.",
        "Il est parti.",
    ]
    # Trained French Punkt does not know "p.ex.": the fallback cuts there too.
    assert splitter.split("Mme Martin a vu des fruits, p.ex. des pommes. Elle est partie.") == [
        "Mme Martin a vu des fruits, p.ex.",
        "des pommes.",
        "Elle est partie.",
    ]


def test_german() -> None:
    splitter = SentenceSplitter("deu_Latn", use_punkt_tab=False)
    assert splitter.split("Am 3. Oktober kam Dr. Müller an, z.B. mit dem Zug. Er blieb.") == [
        "Am 3. Oktober kam Dr. Müller an, z.B. mit dem Zug.",
        "Er blieb.",
    ]


def test_spanish() -> None:
    splitter = SentenceSplitter("spa_Latn", use_punkt_tab=False)
    assert splitter.split("El Sr. García llegó. Ella se fue.") == [
        "El Sr. García llegó.",
        "Ella se fue.",
    ]


def test_russian() -> None:
    splitter = SentenceSplitter("rus_Cyrl", use_punkt_tab=False)
    assert splitter.split("Проф. Иванов пришёл. Он сказал, т.е. объяснил, всё.") == [
        "Проф. Иванов пришёл.",
        "Он сказал, т.е. объяснил, всё.",
    ]
    # Trained Russian Punkt breaks before no capitalised word after an abbreviation; neither
    # does the fallback.
    assert splitter.split("Мы купили яблоки, груши и т.д. Потом ушли.") == [
        "Мы купили яблоки, груши и т.д. Потом ушли."
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("eng_Latn", "english"),
        ("fra_Latn", "french"),
        ("deu_Latn", "german"),
        ("spa_Latn", "spanish"),
        ("rus_Cyrl", "russian"),
        ("ell_Grek", "greek"),
        ("nob_Latn", "norwegian"),
        ("nno_Latn", "norwegian"),
        ("slv_Latn", "slovene"),
        ("fra", "french"),
        ("fr", "french"),
        ("french", "french"),
        ("xyz_Latn", "english"),
        ("zho_Hans", "english"),
    ],
)
def test_punkt_language(code: str, expected: str) -> None:
    assert punkt_language(code) == expected


def test_every_punkt_language_is_reachable_from_a_code() -> None:
    from models.sentences import _ISO639_3_TO_PUNKT

    assert set(_ISO639_3_TO_PUNKT.values()) == PUNKT_LANGUAGES


@pytest.mark.parametrize("code", ["", "English", "eng-Latn", "eng_latn", "e", "../english"])
def test_punkt_language_rejects_malformed_codes(code: str) -> None:
    with pytest.raises(ValueError):
        punkt_language(code)


@pytest.mark.parametrize("language", sorted(PUNKT_LANGUAGES))
def test_fallback_builds_for_every_language(language: str) -> None:
    splitter = SentenceSplitter(language, use_punkt_tab=False)
    assert splitter.split("One. Two") == ["One.", "Two"]


def test_split_sentences_caches_one_splitter_per_language() -> None:
    from models.sentences import _splitter

    split_sentences("Warm up.", "eng_Latn")
    split_sentences("Warm up.", "xyz_Latn")  # unknown: shares the English splitter
    assert _splitter("english") is _splitter(punkt_language("xyz_Latn"))
    assert split_sentences("Hello there. Bye", "eng_Latn") == ["Hello there.", "Bye"]
    assert split_sentences("  ") == []


def test_uses_installed_punkt_tab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_fake_punkt_tab(tmp_path, "dr\np.m\n")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert punkt_tab_available("eng_Latn")
    splitter = SentenceSplitter("eng_Latn")
    assert splitter.uses_punkt_tab
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left."
    assert splitter.split(text) == ["Dr. Smith arrived at 5 p.m. on Monday.", "He left."]
    # The installed model, not the fallback, decides: this fake one lacks "Mr.".
    assert splitter.split("He met Mr. Jones.") == ["He met Mr.", "Jones."]
    assert SentenceSplitter("eng_Latn", use_punkt_tab=False).split("He met Mr. Jones.") == [
        "He met Mr. Jones."
    ]
    assert not SentenceSplitter("eng_Latn", use_punkt_tab=False).uses_punkt_tab


def test_missing_punkt_tab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert not punkt_tab_available("english")
    assert not SentenceSplitter("english").uses_punkt_tab
    with pytest.raises(LookupError):
        SentenceSplitter("english", use_punkt_tab=True)


def test_incomplete_punkt_tab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _install_fake_punkt_tab(tmp_path, "dr\n")
    (model / "ortho_context.tab").unlink()
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    splitter = SentenceSplitter("english")
    assert not splitter.uses_punkt_tab
    # The fallback knows "Mr." (the broken model's "dr"-only list does not).
    assert splitter.split("He met Mr. Jones. Then rest.") == ["He met Mr. Jones.", "Then rest."]
    with pytest.raises(LookupError):
        SentenceSplitter("english", use_punkt_tab=True)
