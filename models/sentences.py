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

On top of Punkt, both modes:

* treat blank lines (paragraph breaks) as sentence boundaries; a single newline inside a
  sentence is plain whitespace and is folded into one space;
* keep a quoted exclamation or question together with a lower-case continuation
  (``"Stop!" she said.`` is one sentence, raw Punkt makes two of it);
* strip every sentence and drop empty ones; a text without final punctuation keeps its last
  fragment as a sentence.

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
# These sets are plain data so they are easy to review and extend; they are tuned to give the
# same answer as the trained models on common cases, not to reproduce them exactly.
#
# Abbreviation types are lower case, without their final period, as Punkt stores them
# ("e.g." -> "e.g"). Single letters need not be listed: Punkt treats "A." as an initial and
# decides from the next word.
# ---------------------------------------------------------------------------------------------

# Abbreviations common to the Latin-script languages we have no dedicated list for.
_COMMON_ABBREVIATIONS: frozenset[str] = frozenset(
    {"etc", "e.g", "i.e", "vs", "cf", "dr", "prof", "ph.d", "approx"}
)

_ENGLISH_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        # titles and honorifics
        "mr", "mrs", "ms", "messrs", "mmes", "dr", "prof", "sr", "jr", "st", "rev", "hon",
        "esq", "pres", "gov", "sen", "rep", "gen", "col", "lt", "capt", "sgt", "cpl", "pvt",
        "maj", "adm", "cmdr", "supt", "ph.d", "m.d", "b.a", "m.a", "b.sc", "m.sc",
        # Latin and scholarly
        "etc", "e.g", "i.e", "vs", "cf", "viz", "ca", "al", "ibid", "op", "approx", "resp",
        "incl", "misc", "fig", "figs", "eq", "eqs", "ref", "refs", "vol", "vols", "ed", "eds",
        "trans", "pp", "chap", "sec", "no", "nos", "est",
        # time
        "a.m", "p.m", "a.d", "b.c",
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        # "sat", "sun" and "wed" are left out on purpose: as ordinary words they end sentences
        # far more often than they abbreviate a weekday, and "may" likewise.
        "mon", "tue", "tues", "thu", "thur", "thurs", "fri",
        # places
        "u.s", "u.s.a", "u.k", "u.n", "e.u", "d.c", "n.y", "l.a", "ave", "blvd", "rd", "mt",
        "ft",
        # organisations and business
        "inc", "ltd", "co", "corp", "bros", "assn", "dept", "univ", "l.l.c", "tel", "ext",
        # units
        "min", "hr", "hrs", "oz", "lb", "lbs", "avg",
    }
)  # fmt: skip

_FRENCH_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "mm", "mme", "mmes", "mlle", "mlles", "dr", "pr", "prof", "st", "ste", "etc", "cf",
        "p.ex", "ex", "env", "c.-à-d", "j.-c", "av", "apr", "bd", "vol", "chap", "éd", "fig",
        "pp", "art", "tél", "cie", "sté", "janv", "févr", "avr", "juil", "sept", "oct", "nov",
        "déc",
    }
)  # fmt: skip

_GERMAN_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "bzw", "ca", "d.h", "dr", "prof", "evtl", "ggf", "inkl", "nr", "str", "u.a", "usw",
        "u.s.w", "v.a", "vgl", "z.b", "z.t", "z.zt", "zzgl", "bspw", "bzgl", "dipl", "ing",
        "hr", "fr", "geb", "gest", "jh", "jhd", "mio", "mrd", "tsd", "abs", "bd", "sog",
        "ehem", "allg", "usf", "o.ä", "s.o", "s.u", "u.u", "i.d.r", "u.v.m", "etc", "tel",
        "jan", "feb", "mär", "apr", "jun", "jul", "aug", "sep", "sept", "okt", "nov", "dez",
    }
)  # fmt: skip

_SPANISH_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "sr", "sra", "srta", "sres", "dr", "dra", "lic", "ing", "arq", "prof", "ud", "uds",
        "vd", "vds", "dña", "etc", "p.ej", "ej", "pág", "págs", "núm", "tel", "av", "avda",
        "ee.uu", "aprox", "cía", "s.a", "s.l", "a.c", "d.c", "dpto", "depto", "vol", "cap",
        "fig", "art", "máx", "mín", "ene", "feb", "mar", "abr", "jun", "jul", "ago", "sept",
        "oct", "nov", "dic",
    }
)  # fmt: skip

_RUSSIAN_ABBREVIATIONS: frozenset[str] = frozenset(
    {
        "т.е", "т.д", "т.п", "т.к", "т.н", "т.ч", "и.о", "н.э", "др", "пр", "см", "ср", "стр",
        "рис", "табл", "гл", "гг", "вв", "ул", "кв", "тыс", "млн", "млрд", "руб", "коп",
        "проф", "акад", "доц", "им", "напр", "англ", "лат", "нем", "франц", "св", "ок",
        "прим", "янв", "февр", "апр", "авг", "сент", "окт", "нояб", "дек",
    }
)  # fmt: skip

# Frequent sentence starters: function words that are written in lower case inside a sentence.
# When one of them follows an abbreviation (or an initial, or an ellipsis) capitalised, a new
# sentence starts ("... at 7 a.m. The sun rose." splits, "Dr. Smith" does not). Words that are
# also common names ("Will", "May", "Mark") are left out.
_ENGLISH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "a", "an", "the", "this", "that", "these", "those", "he", "she", "it", "they", "we",
        "i", "you", "there", "here", "then", "but", "and", "or", "so", "yet", "however",
        "meanwhile", "moreover", "furthermore", "also", "thus", "therefore", "still", "now",
        "instead", "indeed", "nevertheless", "otherwise", "perhaps", "maybe", "finally",
        "later", "today", "in", "on", "at", "for", "after", "before", "when", "while", "if",
        "as", "although", "though", "because", "since", "what", "who", "why", "how", "where",
        "which", "his", "her", "its", "their", "our", "my", "your", "some", "many", "most",
        "all", "each", "every", "both", "one", "is", "are", "was", "were", "do", "does",
        "did", "could", "would", "should", "has", "have", "had", "not", "yes", "please",
    }
)  # fmt: skip

_FRENCH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "le", "la", "les", "un", "une", "des", "il", "elle", "ils", "elles", "je", "nous",
        "vous", "on", "ce", "cette", "ces", "mais", "et", "puis", "alors", "donc", "ensuite",
        "enfin", "en", "dans", "pour", "quand", "si", "qui", "que", "pourquoi", "comment",
        "cependant", "pourtant", "ainsi", "aujourd",
    }
)  # fmt: skip

_GERMAN_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "der", "die", "das", "ein", "eine", "er", "sie", "es", "wir", "ich", "ihr", "man",
        "aber", "und", "dann", "doch", "auch", "so", "in", "im", "am", "als", "wenn", "nach",
        "dies", "diese", "dieser", "was", "wie", "warum", "wo", "heute", "jetzt", "deshalb",
        "daher", "trotzdem",
    }
)  # fmt: skip

_SPANISH_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "el", "la", "los", "las", "un", "una", "él", "ella", "ellos", "ellas", "nosotros",
        "yo", "pero", "y", "entonces", "en", "es", "no", "esto", "este", "esta", "eso", "hay",
        "cuando", "si", "después", "luego", "también", "sin", "por", "para", "qué", "cómo",
    }
)  # fmt: skip

_RUSSIAN_SENT_STARTERS: frozenset[str] = frozenset(
    {
        "он", "она", "оно", "они", "мы", "я", "вы", "ты", "это", "но", "и", "а", "в", "на",
        "после", "когда", "если", "так", "потом", "затем", "однако", "тогда", "что", "как",
        "почему", "где", "там", "здесь", "сегодня",
    }
)  # fmt: skip

# German writes dates as "am 3. Oktober": an ordinal, not a sentence end before a month name.
_GERMAN_COLLOCATIONS: frozenset[tuple[str, str]] = frozenset(
    ("##number##", month)
    for month in (
        "januar", "februar", "märz", "april", "mai", "juni", "juli", "august", "september",
        "oktober", "november", "dezember",
    )
)  # fmt: skip

# (abbreviations, sentence starters, collocations)
_LanguageData = tuple[frozenset[str], frozenset[str], frozenset[tuple[str, str]]]

# Punkt language -> fallback data; Punkt languages not listed get _COMMON_ABBREVIATIONS only.
_FALLBACK_DATA: Mapping[str, _LanguageData] = {
    "english": (_ENGLISH_ABBREVIATIONS, _ENGLISH_SENT_STARTERS, frozenset()),
    "french": (_COMMON_ABBREVIATIONS | _FRENCH_ABBREVIATIONS, _FRENCH_SENT_STARTERS, frozenset()),
    "german": (
        _COMMON_ABBREVIATIONS | _GERMAN_ABBREVIATIONS,
        _GERMAN_SENT_STARTERS,
        _GERMAN_COLLOCATIONS,
    ),
    "spanish": (
        _COMMON_ABBREVIATIONS | _SPANISH_ABBREVIATIONS,
        _SPANISH_SENT_STARTERS,
        frozenset(),
    ),
    "russian": (
        _COMMON_ABBREVIATIONS | _RUSSIAN_ABBREVIATIONS,
        _RUSSIAN_SENT_STARTERS,
        frozenset(),
    ),
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
    ``merge_quote_continuations`` keeps '"Stop!" she said.' in one sentence. Paragraph breaks,
    line folding and quote merging apply to the fallback only: with ``punkt_tab`` the output is
    exactly the reference's ``sent_tokenize`` + strip.
    """

    def __init__(
        self,
        language: str = DEFAULT_PUNKT_LANGUAGE,
        *,
        use_punkt_tab: bool | None = None,
        merge_quote_continuations: bool = True,
    ) -> None:
        self.language = punkt_language(language)
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
        return f"SentenceSplitter({self.language!r}, {source})"

    def split(self, text: str) -> list[str]:
        """Split ``text`` into stripped, non-empty sentences (``[]`` for blank text)."""
        if self.uses_punkt_tab:
            # With the trained model, exactly the reference: sent_tokenize, strip, drop empty.
            return [s.strip() for s in self._tokenizer.tokenize(text) if s.strip()]
        sentences: list[str] = []
        for paragraph in _PARAGRAPH_BREAK_RE.split(text):
            if not paragraph.strip():
                continue
            spans: Iterable[tuple[int, int]] = self._tokenizer.span_tokenize(paragraph)
            if self.merge_quote_continuations:
                spans = _merge_quote_continuations(paragraph, spans)
            for start, end in spans:
                # A single line break inside a sentence is only wrapping: fold it and the
                # indentation around it into one space (SONAR encodes one-line sentences).
                # str.split keeps this linear where a regex like \s*\n\s* can backtrack.
                lines = paragraph[start:end].split("\n")
                sentence = " ".join(line.strip() for line in lines).strip()
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
