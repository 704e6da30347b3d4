"""nltk's ``punkt_tab`` data: used where nltk finds it, else fetched once into the project's cache.

The authors split prompts with nltk's trained Punkt models, the ``punkt_tab`` data package. It is
not on PyPI, so a fresh install lacks it. `ensure_punkt_tab` runs when a model is loaded (server
start, ``sonar-llm generate``) and in ``sonar-llm download``, never per request:

* installed where nltk looks (``$NLTK_DATA``, ``~/nltk_data``, the system folders) or in this
  project's cache (`data_dir`: ``nltk_data`` in ``$SONAR_LLM_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/sonar-llm``): nothing is fetched;
* otherwise nltk's own downloader fetches it from the data index at ``url`` (the ``punkt_url``
  setting, nltk's index by default) into `data_dir`, in nltk's layout, where every later start
  finds it;
* when that fails (offline), one warning is logged and sentences are split with the built-in
  fallback parameters (`models.sentences`); the next start tries again;
* an empty ``url`` turns fetching off (the fallback, logged at info level).
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.cache_dir import default_cache_dir

__all__ = [
    "FETCH_TIMEOUT",
    "NLTK_INDEX_URL",
    "PACKAGE",
    "PunktFetchError",
    "PunktStatus",
    "add_data_dir",
    "data_dir",
    "ensure_punkt_tab",
    "fetch_punkt_tab",
    "installed_path",
]

log = logging.getLogger("sonar_llm.punkt")

#: nltk's own data index (``nltk.downloader.Downloader.DEFAULT_URL``; a test keeps them equal).
NLTK_INDEX_URL = "https://raw.githubusercontent.com/nltk/nltk_data/gh-pages/index.xml"
PACKAGE = "punkt_tab"
#: Seconds one connection or socket read may take while fetching (nltk's own bound is 120 s:
#: a start on a host whose network drops packets should not stall that long).
FETCH_TIMEOUT = 15.0

# The downloader reads its socket timeout from a module global; fetches are serialised so that
# setting it for one fetch cannot leak into another.
_fetch_lock = threading.Lock()


class PunktFetchError(Exception):
    """punkt_tab could not be fetched: one line saying from where and why."""


@dataclass(frozen=True)
class PunktStatus:
    """What `ensure_punkt_tab` found or did."""

    state: Literal["installed", "fetched", "failed", "disabled"]
    path: Path | None  # the punkt_tab folder in use (installed, fetched)
    size: int = 0  # bytes of that folder
    error: str = ""  # why the fetch failed (failed)


def data_dir() -> Path:
    """Where punkt_tab is fetched to: ``nltk_data`` in the project's cache folder."""
    return default_cache_dir() / "nltk_data"


def add_data_dir(directory: Path | str | None = None) -> Path:
    """Put `directory` (default `data_dir()`) on nltk's search path, after nltk's own folders."""
    import nltk

    path = Path(directory) if directory is not None else data_dir()
    if str(path) not in nltk.data.path:
        nltk.data.path.append(str(path))
    return path


def installed_path() -> Path | None:
    """The punkt_tab folder nltk finds (with the English model), or None."""
    import nltk

    from models.sentences import punkt_tab_available

    if not punkt_tab_available():
        return None
    pointer = nltk.data.find("tokenizers/punkt_tab/english/")
    return Path(str(getattr(pointer, "path", pointer))).parent


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _one_line(text: str) -> str:
    return " ".join(text.split())


def fetch_punkt_tab(
    url: str, directory: Path | str | None = None, *, timeout: float = FETCH_TIMEOUT
) -> Path:
    """Install punkt_tab from the nltk data index at `url` into `directory` (default
    `data_dir()`) with nltk's downloader (its checksums, its layout); returns the punkt_tab
    folder. Raises PunktFetchError (one line) when the index or the package cannot be had."""
    from nltk import downloader

    target = add_data_dir(directory)
    errors = io.StringIO()  # the downloader prints its errors; they come back in the exception
    with _fetch_lock:
        saved = downloader.NETWORK_TIMEOUT
        downloader.NETWORK_TIMEOUT = timeout  # type: ignore[assignment]
        try:
            target.mkdir(parents=True, exist_ok=True)
            downloader.Downloader(server_index_url=url, download_dir=str(target)).download(
                PACKAGE,
                download_dir=str(target),
                quiet=True,
                raise_on_error=True,
                print_error_to=errors,
            )
        except Exception as e:  # the downloader's errors are ValueError; a folder's are OSError
            reason = _one_line(str(e) or errors.getvalue() or type(e).__name__)
            raise PunktFetchError(f"could not fetch {PACKAGE} from {url}: {reason}") from None
        finally:
            downloader.NETWORK_TIMEOUT = saved
    from models import sentences

    # Splitters made before the fetch hold the fallback; the next one loads punkt_tab.
    sentences._splitter.cache_clear()
    path = target / "tokenizers" / PACKAGE
    if installed_path() is None:
        raise PunktFetchError(
            f"{PACKAGE} was fetched from {url} into {target} but nltk cannot load it "
            f"(no tokenizers/{PACKAGE}/english there)"
        )
    return path


def ensure_punkt_tab(
    url: str | None,
    *,
    directory: Path | str | None = None,
    timeout: float = FETCH_TIMEOUT,
) -> PunktStatus:
    """punkt_tab where nltk finds it, else fetched once from `url` into `directory` (default
    `data_dir()`); on failure one warning is logged and the fallback splitter stays in use.
    An empty `url` never fetches."""
    add_data_dir(directory)
    found = installed_path()
    if found is not None:
        return PunktStatus("installed", found, _size(found))
    if not url:  # turned off on purpose: no warning (/info and /segment still say "fallback")
        log.info(
            "%s is not installed and fetching it is turned off (punkt_url is empty): "
            "sentences are split with the built-in fallback parameters",
            PACKAGE,
        )
        return PunktStatus("disabled", None)
    try:
        path = fetch_punkt_tab(url, directory, timeout=timeout)
    except PunktFetchError as e:
        log.warning(
            "%s; sentences are split with the built-in fallback parameters (close to the "
            "trained Punkt models, not identical: see the README). To split exactly as the "
            "authors, "
            "run `sonar-llm download` with network access, or install %s into $NLTK_DATA "
            "or %s",
            e,
            PACKAGE,
            Path(directory) if directory is not None else data_dir(),
        )
        return PunktStatus("failed", None, error=str(e))
    log.info("fetched %s into %s", PACKAGE, path)
    return PunktStatus("fetched", path, _size(path))
