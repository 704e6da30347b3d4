"""(sentence, language) → SONAR embedding, bounded LRU: chat histories and repeated documents
are encoded once."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from models.sonar_codec import SonarCodec


class EncoderCache:
    def __init__(self, codec: SonarCodec, capacity: int = 10_000) -> None:
        self.codec = codec
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, texts: Sequence[str], langs: Sequence[str]) -> Tensor:
        """Embeddings [N, D] for texts[i] in langs[i]; misses are encoded in one batch per lang."""
        keys = list(zip(texts, langs, strict=True))
        missing: dict[str, list[str]] = {}
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)
            elif key[0] not in missing.setdefault(key[1], []):
                missing[key[1]].append(key[0])
        found: dict[tuple[str, str], Tensor] = {}
        for lang, batch in missing.items():
            if not batch:
                continue
            for text, emb in zip(batch, self.codec.encode(batch, lang), strict=True):
                found[(text, lang)] = emb
        n_missing = sum(len(b) for b in missing.values())
        self.misses += n_missing
        self.hits += len(keys) - n_missing
        rows = [found[k] if k in found else self._entries[k] for k in keys]
        if self.capacity > 0:
            for key, emb in found.items():
                self._entries[key] = emb
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        if not rows:
            return torch.zeros((0, self.codec.embed_dim), device=self.codec.device)
        return torch.stack(rows)
