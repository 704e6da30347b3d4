"""Asset files named by URL: found in, or downloaded into, fairseq2's download cache.

The layout is fairseq2 0.8's `StandardAssetDownloadManager`, so a cache that either side
filled serves the other: `$FAIRSEQ2_CACHE_DIR/<first 24 hex digits of sha1(URL)>/<file>`. A
download goes to `<hash>.download.tmp/`, is renamed `<hash>.download/` when complete, and its
file is moved into `<hash>/` (a `.zip` or tar archive is extracted there instead). The entry is
the single file in `<hash>/`, or the folder when it holds several.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse, urlunparse
from urllib.request import Request, urlopen

from models.asset_errors import cache_dir

SCHEMES = ("http", "https")
# fairseq2 sends this (hosts answer 403 to unknown agents); the same request gets the same file.
_USER_AGENT = "Mozilla/5.0 (X11; Linux i686; rv:109.0) Gecko/20100101 Firefox/119.0"


class DownloadError(Exception):
    """The URL could not be fetched; `reason` is one line."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"download of {uri} failed: {reason}")
        self.uri = uri
        self.reason = reason


def cache_root() -> Path:
    return Path(cache_dir()).expanduser()


def entry_dir(uri: str, root: Path | None = None) -> Path:
    """`<cache>/<sha1(normalised URL)[:24]>`, as fairseq2 names it."""
    normalised = urlunparse(urlparse(uri))
    digest = hashlib.sha1(normalised.encode()).hexdigest()[:24]
    return (root or cache_root()) / digest


def cached(uri: str, root: Path | None = None) -> Path | None:
    """The cached file (or folder) for `uri`, None when it is not in the cache."""
    folder = entry_dir(uri, root)
    if not folder.is_dir():
        return None
    items = list(folder.iterdir())
    if not items:
        return None
    return items[0] if len(items) == 1 and items[0].is_file() else folder


def fetch(uri: str, root: Path | None = None, say: Callable[[str], None] | None = None) -> Path:
    """The cached entry for `uri`, downloading it first when it is not cached."""
    folder = entry_dir(uri, root)
    found = cached(uri, root)
    if found is not None:
        return found
    if urlparse(uri).scheme not in SCHEMES:
        raise DownloadError(uri, f"only {' and '.join(SCHEMES)} URLs can be downloaded")
    done = folder.with_suffix(".download")
    try:
        if not done.exists():
            if say is not None:
                say(f"downloading {uri} into {folder.parent} ...")
            _download(uri, folder)
        _unpack(done, folder)
    except OSError as e:
        raise DownloadError(uri, f"a system error occurred ({e})") from e
    found = cached(uri, root)
    if found is None:
        raise DownloadError(uri, f"{folder} is empty after the download")
    return found


def _download(uri: str, folder: Path) -> None:
    tmp = folder.with_suffix(".download.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        try:
            response = urlopen(Request(uri, headers={"User-Agent": _USER_AGENT}))
        except HTTPError as e:
            raise DownloadError(uri, f"the server returned HTTP error code {e.code}") from e
        except URLError as e:
            raise DownloadError(uri, f"the address is not reachable ({e.reason})") from e
        with response, tempfile.NamedTemporaryFile(dir=tmp, delete=False) as out:
            total = response.headers.get("Content-Length")
            shutil.copyfileobj(response, out, 1 << 20)
            got = out.tell()
        if total is not None and total.isdigit() and got != int(total):
            raise DownloadError(uri, f"the server sent {got:,} of {int(total):,} bytes")
        name = _filename(response.headers.get("Content-Disposition"), response.geturl())
        Path(out.name).rename(tmp / name)
        tmp.rename(folder.with_suffix(".download"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _filename(disposition: str | None, url: str) -> str:
    if disposition:
        match = re.search(r"filename=\"?([^\"\n]+)\"?", disposition)
        if match:
            return Path(match.group(1)).name or "asset"
    return Path(unquote(urlparse(url).path)).name or "asset"


def _unpack(done: Path, folder: Path) -> None:
    """Move the downloaded file into the entry folder (extracting archives), as fairseq2 does."""
    if not done.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    files = list(done.iterdir())
    if files:
        file = files[0]
        if file.suffix == ".zip":
            with zipfile.ZipFile(file) as z:
                z.extractall(folder)
            file.unlink()
        elif tarfile.is_tarfile(file):
            with tarfile.open(file) as t:
                t.extractall(folder, filter="data")
            file.unlink()
        else:
            file.rename(folder / file.name)
    shutil.rmtree(done)
