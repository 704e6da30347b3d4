"""`sonar-llm download`: put everything a configuration loads into the caches, for offline hosts.

Three parts, each fetched through the code path loading itself uses, so a later load finds it:

* the SONAR-LLM checkpoint: a Hugging Face repo id through `huggingface_hub.snapshot_download`
  with the loader's allow patterns (`models.checkpoint.prefetch`); a local path needs nothing;
* SONAR's encoder, decoder and tokenizer: the file each asset card names (the encoder's and
  decoder's `checkpoint`, the tokenizer card's `tokenizer`, after `tokenizer_ref`), downloaded
  into `$FAIRSEQ2_CACHE_DIR` in fairseq2's layout (`models.sonar.download`, no fairseq2 needed:
  both backends find it there); a `file:` path needs nothing;
* nltk's punkt_tab data (`models.punkt_data`).

A part that fails is reported as one line and the others still run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.asset_errors import (
    SonarAssetError,
    bad_card,
    cache_dir,
    download_failed,
    human_size,
    unknown_card,
)
from models.checkpoint import CheckpointError, prefetch
from models.pipeline import ModelOptions, Sources
from models.punkt_data import PACKAGE, PunktFetchError, fetch_punkt_tab, installed_path
from models.sonar.cards import CardError, CardNotFoundError, CardStore, uri_path
from models.sonar.download import DownloadError, cached, fetch

Say = Callable[[str], None]

# Cache locations a host may have moved; an offline run must see the same values.
CACHE_VARIABLES = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "FAIRSEQ2_CACHE_DIR",
    "FAIRSEQ2_USER_ASSET_DIR",
    "SONAR_LLM_CACHE_DIR",
    "NLTK_DATA",
    "XDG_CACHE_HOME",
)


@dataclass(frozen=True)
class Item:
    """One thing a configuration needs, now on this host."""

    what: str  # "SONAR-LLM checkpoint raxtemur/sonar-llm-900m", "SONAR encoder 'card'", ...
    path: Path
    size: int
    how: str  # "fetched from URL", "already cached", "local"


@dataclass
class Report:
    items: list[Item] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hub: bool = False  # a Hugging Face repo id is part of the configuration


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links followed: the HF cache)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _checkpoint(opts: ModelOptions, src: Sources, report: Report, say: Say) -> None:
    if opts.config is not None and not Path(opts.config).expanduser().is_file():
        report.errors.append(f"config {opts.config} does not exist or is not a file")
    if src.demo:
        say(f"the demo bundle (random weights) is built at {Path(src.model).parent}")
    try:
        kind, path = prefetch(src.model, progress=say)
    except CheckpointError as e:
        report.errors.append(str(e))
        return
    report.hub = report.hub or kind == "hf-hub"
    how = "in the Hugging Face cache" if kind == "hf-hub" else "local, nothing to fetch"
    report.items.append(Item(f"SONAR-LLM checkpoint {src.model}", path, size_of(path), how))


def _sonar_file(store: CardStore, kind: str, name: str, say: Say) -> Item:
    """The file loading SONAR `kind` from card `name` reads, fetched into fairseq2's cache."""
    card = store.tokenizer_card(name) if kind == "tokenizer" else store.card(name)
    uri = card.uri("tokenizer" if kind == "tokenizer" else "checkpoint")
    what = f"SONAR {kind} {name!r}"
    if uri.startswith("file:"):
        path = uri_path(uri)
        if not path.exists():
            raise SonarAssetError(
                f"cannot load {what}: its card points at {path}, which does not exist"
            )
        return Item(what, path, size_of(path), "local, nothing to fetch")
    found = cached(uri)
    if found is not None:
        return Item(what, found, size_of(found), f"already cached (from {uri})")
    say(f"fetching {what} from {uri} into {cache_dir()} ...")
    try:
        path = fetch(uri)
    except DownloadError as e:
        raise download_failed(kind, name, uri, e.reason) from e
    return Item(what, path, size_of(path), f"fetched from {uri}")


def _sonar(src: Sources, report: Report, say: Say) -> None:
    try:
        store = CardStore.discover(src.asset_dirs)
    except (FileNotFoundError, CardError) as e:
        report.errors.append(f"cannot fetch SONAR: {e}")
        return
    for kind, name in (
        ("encoder", src.encoder),
        ("decoder", src.decoder),
        ("tokenizer", src.tokenizer),
    ):
        try:
            report.items.append(_sonar_file(store, kind, name, say))
        except SonarAssetError as e:
            report.errors.append(str(e))
        except CardNotFoundError:
            report.errors.append(str(unknown_card(kind, name, src.asset_dirs)))
        except CardError as e:
            report.errors.append(str(bad_card(kind, name, str(e))))


def _punkt(url: str, report: Report, say: Say) -> None:
    found = installed_path()
    if found is not None:
        report.items.append(Item(f"nltk {PACKAGE}", found, size_of(found), "already installed"))
        return
    if not url:
        report.errors.append(
            f"nltk {PACKAGE} is not installed and punkt_url is empty (fetching turned off)"
        )
        return
    say(f"fetching nltk {PACKAGE} from {url} ...")
    try:
        path = fetch_punkt_tab(url)
    except PunktFetchError as e:
        report.errors.append(str(e))
        return
    report.items.append(Item(f"nltk {PACKAGE}", path, size_of(path), f"fetched from {url}"))


def download(opts: ModelOptions, say: Say) -> Report:
    """Fetch what `opts` loads (checkpoint, SONAR files, punkt_tab) into the caches."""
    report = Report()
    src = Sources.resolve(opts.model, opts.encoder, opts.decoder, opts.tokenizer, opts.asset_dir)
    _checkpoint(opts, src, report, say)
    _sonar(src, report, say)
    _punkt(opts.punkt_url, report, say)
    return report


def describe(item: Item) -> str:
    return f"{item.what}: {item.how}, at {item.path} ({human_size(item.size)})"


def offline_line(report: Report) -> str:
    """The closing line: how to run this configuration offline now."""
    env = [f"{name}={os.environ[name]}" for name in CACHE_VARIABLES if os.environ.get(name)]
    if report.hub:
        env.append("HF_HUB_OFFLINE=1")
    if env:
        how = "run it with " + " ".join(env)
        if report.hub:
            how += " (HF_HUB_OFFLINE=1: no Hub lookups)"
    else:
        how = "no environment variables are needed (default cache folders)"
    return f"this host can now run this configuration offline: {how}"
