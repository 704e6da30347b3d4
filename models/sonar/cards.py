"""fairseq2 asset cards, found and read the way fairseq2 0.8 does, without importing it.

Cards are YAML documents (several per file, `---` apart) in `*.yaml`/`*.yml` files anywhere
under a folder. The folders, in fairseq2's order: the released SONAR cards shipped in this
package (`released_cards/`, as sonar-space ships them), `$FAIRSEQ2_ASSET_DIR` (else
`/etc/fairseq2/assets`), `$FAIRSEQ2_USER_ASSET_DIR` (else `$XDG_CONFIG_HOME/fairseq2/assets`,
else `~/.config/fairseq2/assets`), then the `--asset-dir` folders. As in fairseq2, two sources
defining one name is an error. A card may name a `base` card (fields it lacks are read there);
a file field is a URI (`file://`, `https://`) or a path, relative paths resolving against the
folder of the YAML file that holds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml


class CardError(Exception):
    """A card is missing, malformed or asks for something unsupported: one line, for users."""


class CardNotFoundError(CardError):
    """No card has the name."""


@dataclass(frozen=True)
class Card:
    name: str
    metadata: Mapping[str, Any]
    folder: Path | None  # the YAML file's folder: relative paths resolve against it
    base: Card | None = None

    def _find(self, key: str) -> Card | None:
        card: Card | None = self
        while card is not None and key not in card.metadata:
            card = card.base
        return card

    def get(self, key: str, default: Any = None) -> Any:
        """The field from this card or the nearest base card that has it."""
        found = self._find(key)
        return default if found is None else found.metadata[key]

    def chain(self, key: str) -> list[Any]:
        """Every value of `key` along the base chain, this card's first."""
        out: list[Any] = []
        card: Card | None = self
        while card is not None:
            if key in card.metadata:
                out.append(card.metadata[key])
            card = card.base
        return out

    def uri(self, key: str) -> str:
        """The field as a URI string (`file://...` for paths), as fairseq2's `as_uri`."""
        found = self._find(key)
        if found is None:
            raise CardError(f"asset card {self.name!r} has no {key!r} field")
        value = found.metadata[key]
        if not isinstance(value, str) or not value:
            raise CardError(f"asset card {self.name!r}: {key} must be a URI or a path")
        if urlparse(value).scheme:
            return value
        path = Path(value)
        if not path.is_absolute():
            if found.folder is None:
                raise CardError(f"asset card {self.name!r}: {key} is a relative path")
            path = found.folder / path
        return path.as_uri()


def uri_path(uri: str) -> Path:
    """The local path of a `file:` URI."""
    return Path(unquote(urlparse(uri).path))


def system_dir() -> Path | None:
    env = os.environ.get("FAIRSEQ2_ASSET_DIR")
    if env and Path(env).expanduser().exists():
        return Path(env).expanduser().resolve()
    default = Path("/etc/fairseq2/assets")
    return default if default.exists() else None


def user_dir() -> Path | None:
    env = os.environ.get("FAIRSEQ2_USER_ASSET_DIR")
    path = Path(env).expanduser() if env and Path(env).expanduser().exists() else None
    if path is None:
        xdg = os.environ.get("XDG_CONFIG_HOME")
        path = Path(xdg) / "fairseq2/assets" if xdg else Path("~/.config/fairseq2/assets")
        path = path.expanduser()
    return path.resolve() if path.exists() else None


def _yaml_files(folder: Path) -> Iterator[Path]:
    for root, _dirs, names in os.walk(folder):
        for name in sorted(names):
            if name.endswith((".yaml", ".yml")):
                yield Path(root) / name


def _read_file(path: Path, source: str) -> Iterator[tuple[str, dict[str, Any], Path]]:
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as e:
        raise CardError(f"asset cards in {path} cannot be read as YAML ({source}): {e}") from e
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str) or not doc["name"]:
            raise CardError(f"the asset card at index {i} in {path} has no name")
        meta = dict(doc)
        yield meta.pop("name").strip(), meta, path.parent


class CardStore:
    """Every card of the sources, by name."""

    def __init__(self, sources: Iterable[tuple[str, Iterable[Path]]]) -> None:
        self._cards: dict[str, tuple[dict[str, Any], Path, str]] = {}
        for source, yaml_files in sources:
            seen: set[str] = set()
            for path in yaml_files:
                for name, meta, folder in _read_file(path, source):
                    if name in self._cards and name not in seen:
                        other = self._cards[name][2]
                        raise CardError(
                            f"an asset card named {name!r} is in both {other} and {source}"
                        )
                    if name in seen:
                        raise CardError(f"two asset cards in {source} are named {name!r}")
                    seen.add(name)
                    self._cards[name] = (meta, folder, source)

    @classmethod
    def discover(cls, extra_dirs: Iterable[Path | str] = ()) -> CardStore:
        """The shipped released cards, fairseq2's system and user folders, then `extra_dirs`."""
        shipped = files("models.sonar") / "released_cards"
        sources: list[tuple[str, list[Path]]] = [
            ("package:models.sonar", [Path(str(shipped / n)) for n in _shipped_names()])
        ]
        for known in (system_dir(), user_dir()):
            if known is not None:
                sources.append((str(known), list(_yaml_files(known))))
        seen: set[Path] = set()
        for extra in extra_dirs:
            path = Path(extra).expanduser().resolve()
            if not path.is_dir():
                raise FileNotFoundError(f"asset card folder {path} does not exist")
            if path not in seen:
                seen.add(path)
                sources.append((str(path), list(_yaml_files(path))))
        return cls(sources)

    def names(self) -> list[str]:
        return sorted(self._cards)

    def card(self, name: str) -> Card:
        return self._card(name.strip(), name.strip(), 0)

    def _card(self, name: str, leaf: str, depth: int) -> Card:
        entry = self._cards.get(name)
        if entry is None:
            if name == leaf:
                raise CardNotFoundError(f"no asset card is named {name!r}")
            raise CardError(f"{name} base asset of the {leaf} asset card does not exist")
        if depth > 32:
            raise CardError(f"asset card {leaf!r}: its base cards form a cycle")
        meta, folder, _source = entry
        base = meta.get("base")
        parent = self._card(base, leaf, depth + 1) if isinstance(base, str) else None
        return Card(name, meta, folder, parent)

    def tokenizer_card(self, name: str) -> Card:
        """The card that holds the tokenizer: `name`'s, after following `tokenizer_ref`s."""
        card = self.card(name)
        for _ in range(32):
            ref = card.get("tokenizer_ref")
            if not isinstance(ref, str):
                return card
            try:
                card = self.card(ref)
            except CardNotFoundError:
                raise CardError(
                    f"{ref} asset referenced by the {name} asset card does not exist"
                ) from None
        raise CardError(f"asset card {name!r}: its tokenizer_ref chain forms a cycle")


def _shipped_names() -> list[str]:
    folder = files("models.sonar") / "released_cards"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))
