"""The `native` SONAR backend: tokenizer, encoder and decoder from asset cards, no fairseq2.

`load_native` gives the codec what it needs (`SonarParts`); the fairseq2 backend
(`models.sonar.fairseq2_backend`) gives the same shapes from fairseq2's loaders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from models.decoder_stack import matmul_precision
from models.sonar.cards import CardError, CardStore
from models.sonar.encoder import SonarTextEncoder
from models.sonar.loading import describe, load_decoder, load_encoder, load_tokenizer
from models.sonar.tokenizer import NllbTokenizer


class TextEncoder(Protocol):
    """Sentences to embeddings, in one batch."""

    embed_dim: int

    def encode(self, texts: Sequence[str], lang: str) -> Tensor: ...

    def modules(self) -> list[nn.Module]: ...


class CodecTokenizer(Protocol):
    """What the codec needs of a tokenizer: languages, special ids, the decoder's prefix, text."""

    langs: frozenset[str]
    vocab_size: int
    eos_idx: int
    pad_idx: int

    def source_ids(self, texts: Sequence[str], lang: str) -> list[list[int]]: ...

    def target_prefix(self, lang: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | Tensor) -> str: ...


@dataclass
class SonarParts:
    encoder: TextEncoder
    decoder: nn.Module  # a SonarTextDecoder, or a fairseq2 decoder it can be made from
    tokenizer: CodecTokenizer
    reference: Any = None  # the fairseq2 backend's own generators (the tests' reference)


class NativeTextEncoder:
    """`SonarTextEncoder` fed by `NllbTokenizer`, cut at the encoder's cap as sonar-space cuts."""

    def __init__(
        self, encoder: SonarTextEncoder, tokenizer: NllbTokenizer, device: torch.device
    ) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.device = device
        self.embed_dim = encoder.model_dim
        self.dtype = encoder.layer_norm.weight.dtype

    def encode(self, texts: Sequence[str], lang: str) -> Tensor:
        ids, lengths = self.tokenizer.batch(texts, lang, self.encoder.max_seq_len)
        with torch.inference_mode(), matmul_precision(self.dtype):
            return self.encoder(ids.to(self.device), lengths.to(self.device))

    def modules(self) -> list[nn.Module]:
        return [self.encoder]


def load_native(
    names: tuple[str, str, str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    asset_dirs: Iterable[Path | str] = (),
    say: Callable[[str], None] = lambda _msg: None,
) -> SonarParts:
    """Encoder, decoder and tokenizer by card name (`names`: encoder, decoder, tokenizer)."""
    dirs = list(asset_dirs)
    try:
        store = CardStore.discover(dirs)
    except CardError as e:
        from models.asset_errors import SonarAssetError

        raise SonarAssetError(f"cannot read SONAR asset cards: {e}") from e

    def step(kind: str, name: str, load: Callable[[], Any]) -> Any:
        field = "tokenizer" if kind == "tokenizer" else "checkpoint"
        try:
            size = describe(store.card(name), field)
        except CardError:
            size = ""
        say(f"SONAR {kind} {name}{' ' + size if size else ''} ...")
        start = time.perf_counter()
        loaded = load()
        say(f"... SONAR {kind} done in {time.perf_counter() - start:.1f} s")
        return loaded

    enc_name, dec_name, tok_name = names
    common: dict[str, Any] = {"device": device, "dtype": dtype, "asset_dirs": dirs, "say": say}
    encoder = step("encoder", enc_name, lambda: load_encoder(store, enc_name, **common))
    decoder = step("decoder", dec_name, lambda: load_decoder(store, dec_name, **common))
    tokenizer = step(
        "tokenizer", tok_name, lambda: load_tokenizer(store, tok_name, asset_dirs=dirs, say=say)
    )
    return SonarParts(NativeTextEncoder(encoder, tokenizer, device), decoder, tokenizer)
