"""punkt_tab fetched once at start, with nltk's own downloader, from a local nltk data server.

The server (`file_server`) holds a real nltk index (built by nltk) and a punkt_tab.zip; nltk's
downloader really fetches, checks and unpacks it. Offline is a name that does not resolve, a
server that answers 503, and one that accepts connections and never answers.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import nltk
import pytest
from file_server import NLTK_INDEX_URL, FileServer, proxy_env
from nltk.downloader import Downloader

from models import sentences
from models.punkt_data import NLTK_INDEX_URL as DEFAULT_URL
from models.punkt_data import PACKAGE, data_dir, ensure_punkt_tab
from models.sentences import SentenceSplitter, split_sentences, splitter_name
from server.settings import Settings

TEXT = "Dr. Smith arrived at 5 p.m. on Monday. He met Mr. Jones there. He left."


def test_default_source_is_nltks_own_index() -> None:
    assert DEFAULT_URL == Downloader.DEFAULT_URL
    assert Settings.model_fields["punkt_url"].default == Downloader.DEFAULT_URL


def test_fetched_once_into_the_cache_then_used(nltk_server: tuple[FileServer, bool]) -> None:
    server, real = nltk_server
    target = data_dir()
    assert splitter_name("eng_Latn") == "fallback"  # made before the fetch: must not stay

    status = ensure_punkt_tab(NLTK_INDEX_URL, timeout=10)

    assert status.state == "fetched", status
    assert server.requests == ["/index.xml", "/packages/tokenizers/punkt_tab.zip"]
    # nltk's layout: the archive and the unpacked folder under tokenizers/.
    assert status.path == target / "tokenizers" / PACKAGE
    assert (target / "tokenizers" / "punkt_tab.zip").is_file()
    assert (target / "tokenizers" / PACKAGE / "english" / "abbrev_types.txt").is_file()
    assert status.size > 0
    # The splitter now is Punkt with the fetched model: exactly nltk's sent_tokenize.
    assert splitter_name("eng_Latn") == "punkt_tab"
    expected = [s.strip() for s in nltk.tokenize.sent_tokenize(TEXT)]
    assert split_sentences(TEXT) == expected
    if not real:  # the minimal model knows no "Mr.": proof that it, not the fallback, splits
        assert "He met Mr." in expected
        fallback = SentenceSplitter("eng_Latn", use_punkt_tab=False).split(TEXT)
        assert "He met Mr. Jones there." in fallback

    # A second start: a new process (nltk's path without the cache), same cache folder.
    nltk.data.path[:] = []
    sentences._splitter.cache_clear()
    again = ensure_punkt_tab(NLTK_INDEX_URL, timeout=10)
    assert again.state == "installed"
    assert again.path == status.path
    assert len(server.requests) == 2  # nothing fetched again
    assert splitter_name("eng_Latn") == "punkt_tab"


def _one_warning(caplog: pytest.LogCaptureFixture) -> str:
    records = [r for r in caplog.records if r.name == "sonar_llm.punkt"]
    assert [r.levelno for r in records] == [logging.WARNING], records
    message = records[0].getMessage()
    assert "\n" not in message
    return message


# A hang guard, not a timing: with nltk's own 120 s timeout the silent proxy holds the fetch
# past it, and the test fails instead of passing slowly.
@pytest.mark.timeout(100)
@pytest.mark.parametrize("offline", ["unresolvable", "503", "silent"])
def test_offline_start_falls_back_with_one_warning(
    offline: str,
    no_punkt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    closers = []
    if offline == "503":
        server = FileServer(tmp_path, fail=True)
        closers.append(server.close)
        proxy = server.url
    elif offline == "silent":  # accepts connections (the backlog) and never answers
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        closers.append(sock.close)
        proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    if offline != "unresolvable":
        for name, value in proxy_env(proxy).items():
            monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO, logger="sonar_llm.punkt")
    try:
        status = ensure_punkt_tab(NLTK_INDEX_URL, timeout=2)
    finally:
        for close in closers:
            close()
    assert status.state == "failed" and status.path is None
    message = _one_warning(caplog)
    for needle in (NLTK_INDEX_URL, "fallback", "sonar-llm download", str(no_punkt)):
        assert needle in message, (needle, message)
    assert not (no_punkt / "tokenizers" / PACKAGE).exists()
    assert splitter_name("eng_Latn") == "fallback"
    if offline == "503":
        assert "503" in message


def test_empty_url_never_fetches(no_punkt: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sonar_llm.punkt")
    status = ensure_punkt_tab("")
    assert status.state == "disabled"
    records = [r for r in caplog.records if r.name == "sonar_llm.punkt"]
    assert [r.levelno for r in records] == [logging.INFO]  # chosen: no warning
    assert "punkt_url is empty" in records[0].getMessage()
    assert splitter_name() == "fallback"
