"""Sentence splitting for SONAR-LLM prompts.

SONAR-LLM works on sentence embeddings, so a prompt is first cut into sentences the way the
reference implementation does it: nltk's Punkt (``sent_tokenize``) for the prompt's language,
each sentence stripped and empty ones dropped.

Punkt needs trained parameters (the ``punkt_tab`` nltk data package). Where that package is
installed it is used as is. Where it is not (offline images cannot ``nltk.download`` it), an
*untrained* ``PunktSentenceTokenizer()`` is not an option: it knows no abbreviations and splits
"Dr. Smith" or "5 p.m. on Monday". We then build Punkt from a small parameter set maintained here
(abbreviations, frequent sentence starters, a few collocations) that agrees with the trained
models on the common cases.

By default a splitter does what the reference does and nothing more: Punkt's split, each
sentence stripped, empty ones dropped; with ``punkt_tab`` installed that is exactly
``[s.strip() for s in nltk.sent_tokenize(text, language) if s.strip()]``. SONAR-LLM was trained
on text split that way, quirks included (trained English Punkt cuts after "e.g." and after a
quoted question: ``"Why?" he asked.`` is two sentences), so the fallback parameters aim at the
trained models' answers, not at better ones (tests/models/test_splitter_agreement.py measures
how often they agree: on held-out English news and Wikipedia paragraphs, 99.5% to 100% of
documents split the same).
Rules that Punkt does not have are opt-in (see :class:`SentenceSplitter`), in both modes:

* ``paragraph_breaks``: blank lines (paragraph breaks) end a sentence even without final
  punctuation, and a single newline inside a sentence is plain whitespace, folded into one space;
* ``merge_quote_continuations``: a quoted exclamation or question stays with a lower-case
  continuation (``"Stop!" she said.`` is one sentence, Punkt makes two of it).

Languages are given as SONAR/NLLB codes (``eng_Latn``, ``fra_Latn``, ...) and mapped to Punkt's
model for the language. Languages Punkt has no model for use the English model (trained or
fallback), as the reference does for every prompt. Punkt only knows ``.``, ``?`` and ``!`` as
sentence ends, so e.g. CJK full stops are not boundaries.
"""

import functools
import logging
import re
from collections.abc import Iterable, Mapping

import nltk

# _ORTHO_* are Punkt's orthographic-context flags. They are private names; importing them (rather
# than copying their values) keeps us correct should nltk ever renumber them.
from nltk.tokenize.punkt import (
    _ORTHO_BEG_UC,
    _ORTHO_MID_LC,
    PunktParameters,
    PunktSentenceTokenizer,
    PunktTokenizer,
)

from models.punkt_data import add_data_dir

__all__ = [
    "DEFAULT_PUNKT_LANGUAGE",
    "PUNKT_LANGUAGES",
    "SentenceSplitter",
    "punkt_language",
    "punkt_tab_available",
    "split_sentences",
    "splitter_name",
]

logger = logging.getLogger(__name__)

# punkt_tab is looked up where nltk looks and in the project's cache, where it is fetched to
# (models.punkt_data).
add_data_dir()

DEFAULT_PUNKT_LANGUAGE = "english"

#: Languages the ``punkt_tab`` package has trained models for (its directory names).
PUNKT_LANGUAGES: frozenset[str] = frozenset(
    {
        "czech",
        "danish",
        "dutch",
        "english",
        "estonian",
        "finnish",
        "french",
        "german",
        "greek",
        "italian",
        "malayalam",
        "norwegian",
        "polish",
        "portuguese",
        "russian",
        "slovene",
        "spanish",
        "swedish",
        "turkish",
    }
)

# ISO 639-3 code (the part of an NLLB code before the script) -> Punkt model.
_ISO639_3_TO_PUNKT: Mapping[str, str] = {
    "ces": "czech",
    "dan": "danish",
    "nld": "dutch",
    "eng": "english",
    "est": "estonian",
    "fin": "finnish",
    "fra": "french",
    "deu": "german",
    "ell": "greek",
    "ita": "italian",
    "mal": "malayalam",
    # Bokmål and Nynorsk share Punkt's single Norwegian model.
    "nob": "norwegian",
    "nno": "norwegian",
    "nor": "norwegian",
    "pol": "polish",
    "por": "portuguese",
    "rus": "russian",
    "slv": "slovene",
    "spa": "spanish",
    "swe": "swedish",
    "tur": "turkish",
}

# ISO 639-1 codes, accepted for convenience ("en", "fr", ...).
_ISO639_1_TO_PUNKT: Mapping[str, str] = {
    "cs": "czech",
    "da": "danish",
    "nl": "dutch",
    "en": "english",
    "et": "estonian",
    "fi": "finnish",
    "fr": "french",
    "de": "german",
    "el": "greek",
    "it": "italian",
    "ml": "malayalam",
    "nb": "norwegian",
    "nn": "norwegian",
    "no": "norwegian",
    "pl": "polish",
    "pt": "portuguese",
    "ru": "russian",
    "sl": "slovene",
    "es": "spanish",
    "sv": "swedish",
    "tr": "turkish",
}

# "eng_Latn" (NLLB/SONAR), or a bare "eng" / "en".
_LANG_CODE_RE = re.compile(r"(?P<lang>[a-z]{2,3})(?:_[A-Z][a-z]{3})?")

# A blank line (possibly holding spaces) separates paragraphs, and a paragraph break always ends
# a sentence, even without final punctuation (headings, list items separated by blank lines).
_PARAGRAPH_BREAK_RE = re.compile(r"\n\s*\n")


# Previous sentence ends in ".", "!" or "?" followed by closing quotes: a following fragment that
# starts in lower case continues it ('"Stop!" she said.').
_ENDS_WITH_QUOTED_STOP_RE = re.compile(r"[.!?\u2026][\"'\u2019\u201d\u00bb]+$")

# ---------------------------------------------------------------------------------------------
# Fallback Punkt parameters.
#
# Why this exists: the trained ``punkt_tab`` models cannot be fetched on offline machines, and an
# untrained PunktSentenceTokenizer splits after every abbreviation ("Dr.", "p.m.", "U.S.").
# These sets are plain data so they are easy to review and extend. They are hand-curated (common
# abbreviations and sentence openers of each language), not copied from punkt_tab, and kept to
# the entries on which the trained model for the language agrees, so that the fallback splits
# as the reference does: the goal is the trained models' answer, even where another would read
# better. Each change should keep or raise the agreement test_splitter_agreement.py checks (tuned
# on the Lee background corpus and the first Wikipedia paragraphs; the rest is held out).
#
# Abbreviation types are lower case, without their final period, as Punkt stores them
# ("e.g." -> "e.g"). Single letters need not be listed: Punkt treats "A." as an initial and
# decides from the next word (listing one means never ending a sentence after it).
# ---------------------------------------------------------------------------------------------

# Abbreviations for the languages we have no dedicated list for: the ones most of the trained
# models know ("e.g.", "i.e.", "vs." are abbreviations for a few of them only).
_COMMON_ABBREVIATIONS: frozenset[str] = frozenset({"dr", "prof", "etc"})

# English follows the trained English model, which learnt its abbreviations from American news
# text: the list is what AP style abbreviates, less what that model does not know. Left out on
# purpose, although they are abbreviations: "e.g.", "i.e.", "etc.", "cf.", "no.", "vol.",
# "fig.", "approx.", "Apr." and other months AP spells out, most weekdays, the state names
# that double as words ("La.", "Mass.", "Miss.", "Ind.", "Del.", "Mo."). Trained Punkt ends a
# sentence after those (before a lower-case word too), and SONAR-LLM saw text split that way.
_ENGLISH_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        # titles and honorifics
        "mr", "mrs", "ms", "messrs", "dr", "prof", "sr", "jr", "st", "sen", "rep", "reps",
        "gen", "col", "lt", "maj", "adm", "ph.d",
        # time: AP abbreviates these months before a date, and "Tues.", "Wed.", "Fri."
        "a.m", "p.m", "a.d",
        "jan", "feb", "aug", "sep", "sept", "oct", "nov", "dec", "tues", "wed", "fri",
        # places: countries, cities, AP's state abbreviations
        "u.s", "u.s.a", "u.k", "u.n", "u.s.s.r", "d.c", "l.a", "n.y", "ave",
        "ala", "ariz", "calif", "colo", "conn", "fla", "ga", "ill", "kan", "ky", "mich",
        "minn", "nev", "n.c", "n.d", "n.h", "n.j", "n.m", "okla", "ore", "pa", "r.i", "s.c",
        "tenn", "va", "vt", "w.va", "wash", "wis",
        # business
        "inc", "ltd", "co", "corp", "bros",
        # units and others
        "ft", "mg", "yr", "vs", "ok",
        # "c." (circa) before a year: "from c. 600 to c. 1100"
        "c",
    }
)  # fmt: skip

# French, German, Spanish, Russian: abbreviations of the language that its trained model also
# treats as such. Those it does not know are left out, as for English: the trained French model
# ends a sentence after "Mme." or "p.ex.", the Spanish one after "Sra.", the German one after
# "ca." (text split that way is what the model saw).
_FRENCH_ABBREVIATIONS: frozenset[str] = frozenset({"etc", "cie", "inc", "tél"})

_GERMAN_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "dr", "prof", "fr", "nr", "abs", "bd", "bzw", "d.h", "inkl", "u.a", "usf", "usw", "vgl",
        "z.b", "mio", "mrd", "etc", "st", "chr",
    }
)  # fmt: skip

_SPANISH_ABBREVIATIONS: frozenset[str] = frozenset(
    {"sr", "dr", "ing", "avda", "ee.uu", "s.a", "etc"}
)  # fmt: skip

_RUSSIAN_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "т.е", "т.д", "т.п", "т.к", "т.н", "т.ч", "и.о", "н.э", "др", "пр", "см", "ср", "стр",
        "рис", "табл", "гл", "гг", "вв", "ул", "кв", "тыс", "млн", "млрд", "руб", "коп",
        "проф", "акад", "доц", "им", "напр", "англ", "лат", "нем", "франц", "св", "ок",
        "прим", "янв", "февр", "апр", "авг", "сент", "окт", "нояб", "дек",
        # "д." (дом) before a house number: "ул. Ленина, д. 5"
        "д",
    }
)  # fmt: skip

# Frequent sentence starters: function words that are written in lower case inside a sentence.
# When one of them follows an abbreviation (or an initial, or an ellipsis) capitalised, a new
# sentence starts ("... at 7 a.m. The sun rose." splits, "Dr. Smith" does not). Words that are
# also common names ("Will", "May", "Mark") are left out.
#
# English: the openers after which trained English Punkt ends a sentence that follows an
# abbreviation. Left out on purpose: "A", "An", "And", "She", "We", "You", "Then", "One", "Now",
# "What", ... : the trained model keeps "at 10 a.m. Then we left." in one sentence, having seen
# those words capitalised inside sentences (headlines, titles, quotations).
_ENGLISH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        # articles, demonstratives, pronouns
        "the", "this", "these", "he", "it", "i", "they", "there", "here", "her", "your",
        # conjunctions and subordinators
        "but", "so", "yet", "nor", "if", "when", "while", "since", "although", "though",
        "which",
        # sentence adverbs and connectives
        "however", "meanwhile", "moreover", "furthermore", "nevertheless", "nonetheless",
        "indeed", "instead", "thus", "therefore", "otherwise", "similarly", "separately",
        "finally", "still", "even",
        # prepositions and quantifiers that open news sentences
        "in", "under", "among", "despite", "according", "some", "many", "most", "both",
        # others
        "does", "were", "yes", "please",
    }
)  # fmt: skip

# The other languages' starters likewise: the openers after which their trained model breaks
# (the trained Russian model breaks before none of them after an abbreviation: no list).
_FRENCH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "le", "la", "les", "un", "une", "il", "elle", "ils", "elles", "je", "nous", "on", "ce",
        "cette", "ces", "mais", "puis", "alors", "ensuite", "enfin", "en", "dans", "pour",
        "quand", "si", "comment", "cependant", "pourtant", "ainsi",
    }
)  # fmt: skip

_GERMAN_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "der", "die", "das", "ein", "eine", "er", "sie", "es", "wir", "man", "aber", "doch",
        "auch", "so", "in", "im", "am", "wenn", "nach", "dies", "diese", "dieser", "was", "wie",
        "warum", "wo", "deshalb", "daher", "trotzdem",
    }
)  # fmt: skip

_SPANISH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "el", "la", "los", "las", "él", "ellos", "ellas", "yo", "pero", "entonces", "en",
        "no", "esto", "este", "esta", "si", "luego", "también", "sin", "por",
    }
)  # fmt: skip

# German writes dates as "am 3. Oktober" and centuries as "im 19. Jahrhundert": an ordinal, not
# a sentence end before a month name or "Jahrhundert".
_GERMAN_COLLOCATIONS: frozenset[tuple[str, str]] = frozenset(
    ("##number##", word)
    for word in (
        "januar", "februar", "märz", "april", "mai", "juni", "juli", "august", "september",
        "oktober", "november", "dezember", "jahrhundert",
    )
)  # fmt: skip

# (abbreviations, sentence starters, collocations)
_LanguageData = tuple[frozenset[str], frozenset[str], frozenset[tuple[str, str]]]

# Punkt language -> fallback data; Punkt languages not listed get _COMMON_ABBREVIATIONS only.
_FALLBACK_DATA: Mapping[str, _LanguageData] = {
    "english": (_ENGLISH_ABBREVIATIONS, _ENGLISH_SENT_STARTERS, frozenset()),
    "french": (_FRENCH_ABBREVIATIONS, _FRENCH_SENT_STARTERS, frozenset()),
    "german": (_GERMAN_ABBREVIATIONS, _GERMAN_SENT_STARTERS, _GERMAN_COLLOCATIONS),
    "spanish": (_SPANISH_ABBREVIATIONS, _SPANISH_SENT_STARTERS, frozenset()),
    "russian": (_RUSSIAN_ABBREVIATIONS, frozenset(), frozenset()),
}


def punkt_language(lang: str) -> str:
    """Map a SONAR/NLLB language code (``"fra_Latn"``) to the name of its Punkt model.

    Also accepts a bare ISO 639-3 or 639-1 code (``"fra"``, ``"fr"``) and a Punkt model name
    (``"french"``). Well-formed codes of languages Punkt has no model for map to ``"english"``.
    Raises ``ValueError`` for anything that is not a language code.
    """
    if lang in PUNKT_LANGUAGES:
        return lang
    match = _LANG_CODE_RE.fullmatch(lang)
    if match is None:
        raise ValueError(f"not a language code: {lang!r} (expected e.g. 'eng_Latn')")
    code = match["lang"]
    table = _ISO639_3_TO_PUNKT if len(code) == 3 else _ISO639_1_TO_PUNKT
    return table.get(code, DEFAULT_PUNKT_LANGUAGE)


def punkt_tab_available(language: str = DEFAULT_PUNKT_LANGUAGE) -> bool:
    """Whether the trained ``punkt_tab`` model for ``language`` is installed."""
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{punkt_language(language)}/")
    except LookupError:
        return False
    return True


def _fallback_parameters(language: str) -> PunktParameters:
    """Punkt parameters built from the data above, for when ``punkt_tab`` is missing."""
    abbreviations, starters, collocations = _FALLBACK_DATA.get(
        language, (_COMMON_ABBREVIATIONS, frozenset(), frozenset())
    )
    params = PunktParameters()
    params.abbrev_types = set(abbreviations)
    params.sent_starters = set(starters)
    params.collocations = set(collocations)
    # Record the starters as "seen capitalised at a sentence start, lower case inside one". That
    # is what lets Punkt's orthographic heuristic end a sentence after an initial ("Plan B. The
    # next step") and not only after a known abbreviation.
    for word in starters:
        params.add_ortho_context(word, _ORTHO_BEG_UC | _ORTHO_MID_LC)
    return params


def _merge_quote_continuations(
    text: str, spans: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Join a span starting in lower case to a previous span ending in ``!"``, ``?"``, ``."``.

    Punkt cuts after any ``!`` or ``?``, so '"Stop!" she said.' would give '"Stop!"' and
    'she said.'; a lower-case continuation shows the quote was part of the sentence.
    """
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and text[start : start + 1].islower():
            prev_start, prev_end = merged[-1]
            # Only the tail matters; searching the whole (growing) span would be quadratic.
            if _ENDS_WITH_QUOTED_STOP_RE.search(text[max(prev_start, prev_end - 8) : prev_end]):
                merged[-1] = (prev_start, end)
                continue
        merged.append((start, end))
    return merged


class SentenceSplitter:
    """Splits text into sentences with Punkt for one language.

    ``language`` is a Punkt model name or a language code (see :func:`punkt_language`).
    ``use_punkt_tab``: ``None`` (default) uses the trained ``punkt_tab`` model when it is
    installed and the built-in fallback parameters otherwise; ``True`` requires the trained model
    (``LookupError`` if missing); ``False`` always uses the fallback (deterministic, for tests).

    With the defaults the output is the reference's (``sent_tokenize``, strip, drop empty). The
    opt-in rules, for text that is not what the model was trained on, apply with either model:
    ``paragraph_breaks`` ends a sentence at every blank line and folds single line breaks inside
    a sentence into spaces; ``merge_quote_continuations`` keeps '"Stop!" she said.' in one
    sentence.
    """

    def __init__(
        self,
        language: str = DEFAULT_PUNKT_LANGUAGE,
        *,
        use_punkt_tab: bool | None = None,
        paragraph_breaks: bool = False,
        merge_quote_continuations: bool = False,
    ) -> None:
        self.language = punkt_language(language)
        self.paragraph_breaks = paragraph_breaks
        self.merge_quote_continuations = merge_quote_continuations
        tokenizer: PunktSentenceTokenizer | None = None
        if use_punkt_tab or (use_punkt_tab is None and punkt_tab_available(self.language)):
            try:
                # The same tokenizer that nltk.tokenize.sent_tokenize(text, language) uses; we
                # hold it ourselves to get character spans and to load it once.
                tokenizer = PunktTokenizer(self.language)
            except LookupError as error:
                if use_punkt_tab:
                    raise
                # A partially installed model: better to split with the fallback than to fail.
                logger.warning("unusable punkt_tab model, using built-in parameters: %s", error)
        #: Whether the trained punkt_tab model is in use (False: built-in fallback parameters).
        self.uses_punkt_tab = tokenizer is not None
        if tokenizer is None:
            logger.info("punkt_tab not installed for %r: using built-in parameters", self.language)
            tokenizer = PunktSentenceTokenizer(_fallback_parameters(self.language))
        self._tokenizer = tokenizer

    def __repr__(self) -> str:
        source = "punkt_tab" if self.uses_punkt_tab else "fallback"
        rules = [
            name
            for name in ("paragraph_breaks", "merge_quote_continuations")
            if getattr(self, name)
        ]
        return f"SentenceSplitter({self.language!r}, {source}{''.join(', ' + r for r in rules)})"

    def split(self, text: str) -> list[str]:
        """Split ``text`` into stripped, non-empty sentences (``[]`` for blank text)."""
        if not (self.paragraph_breaks or self.merge_quote_continuations):
            # The reference: sent_tokenize (Punkt's tokenize), strip, drop empty.
            return [s.strip() for s in self._tokenizer.tokenize(text) if s.strip()]
        paragraphs = _PARAGRAPH_BREAK_RE.split(text) if self.paragraph_breaks else [text]
        sentences: list[str] = []
        for paragraph in paragraphs:
            if not paragraph.strip():
                continue
            spans: Iterable[tuple[int, int]] = self._tokenizer.span_tokenize(paragraph)
            if self.merge_quote_continuations:
                spans = _merge_quote_continuations(paragraph, spans)
            for start, end in spans:
                sentence = paragraph[start:end]
                if self.paragraph_breaks:
                    # A single line break inside a sentence is only wrapping: fold it and the
                    # indentation around it into one space (SONAR encodes one-line sentences).
                    # str.split keeps this linear where a regex like \s*\n\s* can backtrack.
                    sentence = " ".join(line.strip() for line in sentence.split("\n"))
                sentence = sentence.strip()
                if sentence:
                    sentences.append(sentence)
        return sentences


@functools.lru_cache(maxsize=len(PUNKT_LANGUAGES))
def _splitter(language: str) -> SentenceSplitter:
    """One shared splitter per Punkt language (loading a model costs a few milliseconds)."""
    return SentenceSplitter(language)


def splitter_name(lang: str = "eng_Latn") -> str:
    """Which splitter `split_sentences` uses for ``lang``: "punkt_tab" or "fallback"."""
    return "punkt_tab" if _splitter(punkt_language(lang)).uses_punkt_tab else "fallback"


def split_sentences(text: str, lang: str = "eng_Latn") -> list[str]:
    """Split ``text`` into sentences for the SONAR/NLLB language ``lang``."""
    return _splitter(punkt_language(lang)).split(text)
