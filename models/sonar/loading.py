"""Load SONAR's tokenizer, encoder and decoder by asset-card name, with no fairseq2.

Files: a card's `checkpoint`/`tokenizer` is a path (relative to its YAML), a `file://` URI or
an http(s) URL served from, or downloaded into, fairseq2's cache (`models.sonar.download`).
Checkpoints are read with `torch.load(weights_only=True, mmap=True)`: the state under "model",
already in fairseq2's names (the released files are; sonar-space's conversions only apply to
fairseq1-era files, refused here with a clear error). The module is built on the meta device and
each tensor converted to the wanted device and dtype one at a time, so loading never holds a
second full copy of the weights: the file's pages stay in the (reclaimable) page cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from models.asset_errors import (
    bad_card,
    cache_dir,
    download_failed,
    human_size,
    unknown_card,
)
from models.sonar.cards import Card, CardError, CardNotFoundError, CardStore, uri_path
from models.sonar.config import decoder_config, encoder_config, merge_overrides
from models.sonar.download import DownloadError, cached, fetch
from models.sonar.encoder import SonarTextEncoder
from models.sonar.tokenizer import NllbTokenizer

M = TypeVar("M", bound=nn.Module)
Say = Callable[[str], None]


def file_of(card: Card, field: str, kind: str, say: Say | None = None) -> Path:
    """The local file a card's field names, downloaded into the cache when it is a URL."""
    uri = card.uri(field)
    if uri.startswith("file:"):
        path = uri_path(uri)
        if not path.exists():
            raise bad_card(kind, card.name, f"its card points at {path}, which does not exist")
        return path
    try:
        return fetch(uri, say=say)
    except DownloadError as e:
        raise download_failed(kind, card.name, uri, e.reason) from e


def describe(card: Card, field: str) -> str:
    """`(3.5 GB)`, `(to download from URL into CACHE)` or `(PATH is missing)`; never raises."""
    try:
        uri = card.uri(field)
        path = uri_path(uri) if uri.startswith("file:") else cached(uri)
        if path is None:
            return f"(to download from {uri} into {cache_dir()})"
        if not path.exists():
            return f"({path} is missing)"
        size = sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else None
        return f"({human_size(size if size is not None else path.stat().st_size)})"
    except (CardError, OSError):
        return ""


def load_state(path: Path) -> dict[str, Tensor]:
    """The checkpoint's tensors (memory-mapped), never executing pickled code."""
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path} holds no state dict of tensors (under 'model')")
    if "state_dict" in loaded or not any("." in k for k in loaded):
        raise ValueError(f"{path} is a fairseq1-era checkpoint: convert it with sonar-space")
    return loaded


def materialize(module: M, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> M:
    """Put `state` into `module` (built on the meta device), converting one tensor at a time.

    Tensors that alias one another in the checkpoint stay one tensor (a tied projection)."""
    converted: dict[tuple[object, ...], Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if key not in converted:
            # A copy of its own (not a view of the mapped file): the module owns its memory.
            dt = dtype if t.is_floating_point() else t.dtype
            converted[key] = t.to(device=device, dtype=dt, copy=True)
        out[name] = converted[key]
    missing, unexpected = module.load_state_dict(out, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return module.eval()


def _load(
    kind: str,
    name: str,
    card: Card,
    build: Callable[[], M],
    device: torch.device,
    dtype: torch.dtype,
    say: Say | None,
) -> M:
    path = file_of(card, "checkpoint", kind, say)
    try:
        state = load_state(path)
        module = build()
        return materialize(module, state, device, dtype)
    except ValueError as e:
        raise bad_card(kind, name, str(e)) from e


def _card(store: CardStore, kind: str, name: str, dirs: Iterable[Path | str]) -> Card:
    try:
        return store.tokenizer_card(name) if kind == "tokenizer" else store.card(name)
    except CardNotFoundError:
        raise unknown_card(kind, name, dirs) from None
    except CardError as e:
        raise bad_card(kind, name, str(e)) from e


def load_encoder(
    store: CardStore,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    asset_dirs: Iterable[Path | str] = (),
    say: Say | None = None,
) -> SonarTextEncoder:
    card = _card(store, "encoder", name, asset_dirs)
    try:
        config = encoder_config(card)
    except CardError as e:
        raise bad_card("encoder", name, str(e)) from e
    return _load(
        "encoder",
        name,
        card,
        lambda: SonarTextEncoder(**vars(config), device="meta"),
        device,
        dtype,
        say,
    )


def load_decoder(
    store: CardStore,
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    asset_dirs: Iterable[Path | str] = (),
    say: Say | None = None,
) -> nn.Module:
    from models.sonar.decoder import SonarTextDecoder

    card = _card(store, "decoder", name, asset_dirs)
    try:
        config = decoder_config(card)
    except CardError as e:
        raise bad_card("decoder", name, str(e)) from e
    return _load(
        "decoder", name, card, lambda: SonarTextDecoder(**vars(config)), device, dtype, say
    )


def load_tokenizer(
    store: CardStore, name: str, *, asset_dirs: Iterable[Path | str] = (), say: Say | None = None
) -> NllbTokenizer:
    card = _card(store, "tokenizer", name, asset_dirs)
    family = card.get("tokenizer_family")
    if family != "nllb":
        raise bad_card("tokenizer", name, f"tokenizer family {family!r} is not supported (nllb)")
    config: dict[str, Any] = {"langs": ["en"], "default_lang": "en"}  # fairseq2's defaults
    for overrides in reversed(card.chain("tokenizer_config")):
        config = merge_overrides(config, overrides)
    path = file_of(card, "tokenizer", "tokenizer", say)
    try:
        return NllbTokenizer.load(path, list(config["langs"]), str(config["default_lang"]))
    except (OSError, RuntimeError, ValueError) as e:
        raise bad_card("tokenizer", name, f"{path} is not a SentencePiece model ({e})") from e
