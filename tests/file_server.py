"""Local HTTP servers for download tests: files served from a folder on 127.0.0.1, counted.

`FileServer` answers both plain requests (`GET /encoder.pt`, as fairseq2 sends them) and proxy
requests (`GET http://host/path`, as urllib sends them through `http_proxy`). nltk's downloader
refuses loopback and private addresses (its SSRF guard), so tests reach the nltk data server as
an HTTP proxy for the never-resolved host `NLTK_HOST`, which nltk allows with
`NLTK_ALLOW_PROXIED_URLOPEN=1`: the downloader's own checks stay on.

`nltk_data_tree` writes a real nltk data server tree: ``index.xml`` built by nltk's own
`nltk.downloader.build_index` and ``packages/tokenizers/punkt_tab.zip``, from the real punkt_tab
files when this machine has them, else from the minimal model `install_fake_punkt_tab` writes.
"""

from __future__ import annotations

import importlib.util
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse
from xml.etree import ElementTree

import nltk
from helpers import install_fake_punkt_tab
from nltk.downloader import build_index

NLTK_HOST = "nltk-data.invalid"  # RFC 6761: never resolves, so only the proxy can serve it
NLTK_INDEX_URL = f"http://{NLTK_HOST}/index.xml"


class FileServer:
    """Serves `root`'s files on 127.0.0.1; `requests` lists the paths asked for; `fail` makes
    every answer a 503."""

    def __init__(self, root: Path, *, fail: bool = False) -> None:
        self.root = root.resolve()
        self.fail = fail
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlparse(self.path).path
                outer.requests.append(path)
                file = (outer.root / path.lstrip("/")).resolve()
                if outer.fail:
                    self.send_error(503, "unavailable (test)")
                    return
                if not file.is_file() or outer.root not in file.parents:
                    self.send_error(404)
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def proxy_env(proxy: str) -> dict[str, str]:
    """Environment that sends nltk's requests for `NLTK_HOST` through `proxy` (and nothing for
    127.0.0.1 through it)."""
    return {
        "http_proxy": proxy,
        "HTTP_PROXY": proxy,
        "https_proxy": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
        "NLTK_ALLOW_PROXIED_URLOPEN": "1",
    }


# nltk's search path as the process started (tests empty it to play a host without punkt_tab).
_NLTK_PATH = list(nltk.data.path)


def real_punkt_tab() -> Path | None:
    """A real punkt_tab folder on this machine (nltk's data path or llama-index's copy)."""
    candidates = [Path(p) / "tokenizers" / "punkt_tab" for p in _NLTK_PATH]
    if importlib.util.find_spec("llama_index") is not None:
        spec = importlib.util.find_spec("llama_index.core")
        for location in (spec.submodule_search_locations or []) if spec else []:
            static = Path(location) / "_static" / "nltk_cache" / "tokenizers" / "punkt_tab"
            candidates.append(static)
    return next((c for c in candidates if (c / "english").is_dir()), None)


def punkt_on_nltk_path() -> Path | None:
    """The punkt_tab folder nltk's default search path already holds on this machine, if any."""
    found = (Path(p) / "tokenizers" / "punkt_tab" for p in _NLTK_PATH)
    return next((p for p in found if (p / "english").is_dir()), None)


def nltk_data_tree(root: Path) -> tuple[Path, bool]:
    """Write an nltk data server tree (index.xml + packages/) to `root`; returns the punkt_tab
    folder the zip was made from and whether it is the real one."""
    source = real_punkt_tab()
    real = source is not None
    if source is None:
        source = install_fake_punkt_tab(root / "source", "dr\np.m\n").parent
    packages = root / "packages" / "tokenizers"
    packages.mkdir(parents=True)
    with zipfile.ZipFile(packages / "punkt_tab.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(source, "punkt_tab")
        for path in sorted(_walk(source)):
            archive.write(path, f"punkt_tab/{path.relative_to(source).as_posix()}")
    (packages / "punkt_tab.xml").write_text(
        '<package id="punkt_tab" name="Punkt Tokenizer Models" unzip="1" '
        'license="Apache 2.0" author="Jan Strunk" />\n',
        encoding="utf-8",
    )
    index = build_index(str(root), f"http://{NLTK_HOST}/packages")
    ElementTree.ElementTree(index).write(root / "index.xml", encoding="utf-8", xml_declaration=True)
    return source, real


def _walk(folder: Path) -> Iterator[Path]:
    yield from folder.rglob("*")
