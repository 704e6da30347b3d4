"""`sonar-llm download`: put everything a configuration loads into the caches, for offline hosts.

Three parts, each fetched through the code path loading itself uses, so a later load finds it:

* the SONAR-LLM checkpoint: a Hugging Face repo id through `huggingface_hub.snapshot_download`
  with the loader's allow patterns (`models.checkpoint.prefetch`); a local path needs nothing;
* SONAR's encoder, decoder and tokenizer: the file each asset card names (the encoder's and
  decoder's `checkpoint`, the tokenizer card's `tokenizer`, after `tokenizer_ref`), through
  fairseq2's asset download manager into `$FAIRSEQ2_CACHE_DIR`; a `file:` path needs nothing;
* nltk's punkt_tab data (`models.punkt_data`).

A part that fails is reported as one line and the others still run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.asset_errors import SonarAssetError, cache_dir, explain, human_size
from models.checkpoint import CheckpointError, prefetch
from models.pipeline import ModelOptions, Sources
from models.punkt_data import PACKAGE, PunktFetchError, fetch_punkt_tab, installed_path

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


def _sonar_file(kind: str, name: str, dirs: list[Path | str], say: Say) -> Item:
    """The file loading SONAR `kind` from card `name` reads, fetched into fairseq2's cache."""
    from fairseq2.assets import AssetDownloadError, get_asset_download_manager, get_asset_store
    from fairseq2.data.tokenizers import resolve_tokenizer_reference

    store = get_asset_store()
    card = store.retrieve_card(name)
    field_name = "checkpoint"
    if kind == "tokenizer":
        card = resolve_tokenizer_reference(store, card)
        field_name = "tokenizer"
    uri = card.field(field_name).as_uri()
    what = f"SONAR {kind} {name!r}"
    if uri.scheme == "file":
        path = uri.to_path()
        if not path.exists():
            raise SonarAssetError(
                f"cannot load {what}: its card points at {path}, which does not exist"
            )
        return Item(what, path, size_of(path), "local, nothing to fetch")
    manager = get_asset_download_manager()
    download = manager.download_tokenizer if kind == "tokenizer" else manager.download_model
    try:
        path = download(uri, local_only=True)
        how = f"already cached (from {uri})"
    except AssetDownloadError:
        say(f"fetching {what} from {uri} into {cache_dir()} ...")
        path = download(uri)
        how = f"fetched from {uri}"
    return Item(what, path, size_of(path), how)


def _sonar(src: Sources, report: Report, say: Say) -> None:
    from models.assets import ensure_asset_dirs

    try:
        ensure_asset_dirs(src.asset_dirs)
    except FileNotFoundError as e:
        report.errors.append(f"cannot fetch SONAR: {e}")
        return
    for kind, name in (
        ("encoder", src.encoder),
        ("decoder", src.decoder),
        ("tokenizer", src.tokenizer),
    ):
        try:
            report.items.append(_sonar_file(kind, name, src.asset_dirs, say))
        except SonarAssetError as e:
            report.errors.append(str(e))
        except Exception as e:
            explained = explain(kind, name, e, src.asset_dirs)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            report.errors.append(str(explained or f"cannot fetch SONAR {kind} {name!r}: {reason}"))


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
