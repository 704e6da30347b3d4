"""SONAR asset cards: what a load will read (for progress lines) and what a failure means.

fairseq2 reports a missing SONAR file as a long traceback ending in `AssetDownloadError`,
`ModelNotKnownError` or `AssetCardError`. `explain` turns those into one line that says what was
wanted, where from, and the two ways out: let it download into `$FAIRSEQ2_CACHE_DIR`, or put
the files on disk and describe them in a card in an `--asset-dir` folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

README_HINT = 'see README "Using a real model"'


class SonarAssetError(Exception):
    """A SONAR encoder, decoder or tokenizer could not be loaded: one line, for users."""


def human_size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def cache_dir() -> str:
    """Where fairseq2 downloads assets (as fairseq2 resolves it), for messages."""
    if os.environ.get("FAIRSEQ2_CACHE_DIR"):
        return os.environ["FAIRSEQ2_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "fairseq2" / "assets")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe(card_name: str, kind: str) -> str:
    """`(3.5 GB)` when the card's file is on disk (local or downloaded already),
    `(to download from URL)` when it is not, "" when the card cannot tell (never raises)."""
    field = "tokenizer" if kind == "tokenizer" else "checkpoint"
    try:
        from fairseq2.assets import get_asset_download_manager, get_asset_store

        card = get_asset_store().retrieve_card(card_name)
        value = card.maybe_get_field(field)
        if value is None:
            return ""
        uri = value.as_uri()
        manager = get_asset_download_manager()
        try:
            if field == "tokenizer":
                path = manager.download_tokenizer(uri, local_only=True, progress=False)
            else:
                path = manager.download_model(uri, local_only=True, progress=False)
        except Exception:
            if uri.scheme == "file":
                return f"({uri.to_path()} is missing)"
            return f"(to download from {uri} into {cache_dir()})"
        return f"({human_size(_size(Path(path)))})"
    except Exception:
        return ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _local(kind: str) -> str:
    return (
        f"or put the file on disk, describe it in an asset card (YAML) in a folder passed with "
        f"--asset-dir (SONAR_LLM_ASSET_DIR) and name that card with --{kind}; {README_HINT}"
    )


def download_failed(kind: str, card_name: str, uri: str, reason: str) -> SonarAssetError:
    """A card's file is not cached and could not be downloaded."""
    return SonarAssetError(
        f"cannot load SONAR {kind} {card_name!r}: download of {uri} failed: "
        f"{reason or 'unknown error'}. Run once with network access to download it into "
        f"$FAIRSEQ2_CACHE_DIR ({cache_dir()}), or copy a filled cache there, {_local(kind)}"
    )


def unknown_card(kind: str, card_name: str, asset_dirs: Iterable[Path | str]) -> SonarAssetError:
    dirs = ", ".join(str(d) for d in asset_dirs) or "none given"
    return SonarAssetError(
        f"cannot load SONAR {kind} {card_name!r}: no fairseq2 asset card has that name "
        f"(searched the cards fairseq2 and sonar-space ship, $FAIRSEQ2_USER_ASSET_DIR and "
        f"--asset-dir folders: {dirs}); check the name given with --{kind}, {_local(kind)}"
    )


def bad_card(kind: str, card_name: str, message: str) -> SonarAssetError:
    """The card is malformed, or the file it names is missing or unusable."""
    return SonarAssetError(
        f"cannot load SONAR {kind} {card_name!r}: {_first_line(message).rstrip('.')}; fix the "
        f"card or put the file where it points, {README_HINT}"
    )


def explain(
    kind: str, card_name: str, error: BaseException, asset_dirs: Iterable[Path | str] = ()
) -> SonarAssetError | None:
    """One line for a fairseq2 failure to load `card_name` (`kind`: encoder, decoder or
    tokenizer), or None when `error` is not about finding or fetching the asset."""
    from fairseq2.assets import (
        AssetCardError,
        AssetCardNotValidError,
        AssetDownloadError,
        AssetMetadataError,
    )
    from fairseq2.assets.store import AssetNotFoundError
    from fairseq2.data.tokenizers.hub import TokenizerNotKnownError
    from fairseq2.models.hub import ModelNotKnownError

    if isinstance(error, AssetDownloadError):
        reason = str(error).split(" failed.", 1)[-1].strip().rstrip(".")
        cause = error.__cause__
        detail = getattr(cause, "reason", None) or cause
        if detail:
            reason = f"{reason} ({detail})" if reason else str(detail)
        return download_failed(kind, card_name, str(error.uri), reason)
    if isinstance(error, ModelNotKnownError | TokenizerNotKnownError | AssetNotFoundError):
        return unknown_card(kind, card_name, asset_dirs)
    if isinstance(error, AssetCardError | AssetCardNotValidError | AssetMetadataError):
        return bad_card(kind, card_name, str(error))
    return None
