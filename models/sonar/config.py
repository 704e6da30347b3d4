"""The shapes of SONAR's text encoder and decoder, read from an asset card as fairseq2 reads them.

A card names a model family (`transformer_encoder` / `transformer_decoder`), an architecture
(`basic`, ...) and optional `model_config` overrides (`_set_` / `_del_` directives, merged the
way fairseq2's config merger does). The architectures' defaults are sonar-space's
(`sonar/models/sonar_text/config.py`); only what the modules need is kept, and settings this
runtime does not implement (another pooling, activation or position encoding) are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models.sonar.cards import Card, CardError

ENCODER_FAMILY = "transformer_encoder"
DECODER_FAMILY = "transformer_decoder"

_VOCAB = {"size": 256206, "unk_idx": 1, "bos_idx": 2, "eos_idx": 3, "pad_idx": 1}
# The `basic` architecture of both families (the released SONAR text encoder and decoder).
_BASIC: dict[str, Any] = {
    "model_dim": 1024,
    "max_seq_len": 512,
    "vocab_info": _VOCAB,
    "num_encoder_layers": 24,
    "num_decoder_layers": 24,
    "num_encoder_attn_heads": 16,
    "num_decoder_attn_heads": 16,
    "ffn_inner_dim": 8192,
    "activation_fn": "ReLU",
    "no_scale_embedding": False,
    "no_token_positional_embeddings": False,
    "learned_pos": False,
}


def _small() -> dict[str, Any]:
    return {
        **_BASIC,
        "vocab_info": {**_VOCAB, "size": 32005},
        "num_encoder_layers": 6,
        "num_decoder_layers": 6,
        "ffn_inner_dim": 4096,
    }


ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    ENCODER_FAMILY: {
        "basic": {**_BASIC, "pooling": "mean", "_from_fairseq": True},
        "small": {**_small(), "pooling": "mean", "_from_fairseq": True},
    },
    DECODER_FAMILY: {
        "basic": _BASIC,
        "small": _small(),
        "toy": {
            **_BASIC,
            "model_dim": 32,
            "vocab_info": {**_VOCAB, "size": 1024},
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "num_encoder_attn_heads": 4,
            "num_decoder_attn_heads": 4,
            "ffn_inner_dim": 128,
        },
    },
}


@dataclass(frozen=True)
class TextModelConfig:
    """Constructor keywords of `SonarTextEncoder` and `SonarTextDecoder` (`vars(config)`).

    `pad_idx` is the model config's pad index (it offsets positions); `max_seq_len` is the
    longest sequence the module takes (the encoder's includes fairseq's `pad_idx + 1` offset).
    """

    model_dim: int
    num_layers: int
    num_heads: int
    ffn_inner_dim: int
    vocab_size: int
    pad_idx: int
    max_seq_len: int


def merge_overrides(target: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """fairseq2's config merge: `_del_` drops keys, nested mappings merge, `_set_` replaces."""
    dropped = set(overrides.get("_del_") or ())
    out = {k: copy.deepcopy(v) for k, v in target.items() if k not in dropped}
    for key, value in overrides.items():
        if key in ("_del_", "_set_"):
            continue
        if isinstance(value, Mapping):
            base = out.get(key)
            out[key] = merge_overrides(base if isinstance(base, Mapping) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    for key, value in (overrides.get("_set_") or {}).items():
        out[key] = copy.deepcopy(value)
    return out


def card_config(card: Card, family: str) -> dict[str, Any]:
    """The card's architecture defaults with every `model_config` in its base chain applied."""
    got = card.get("model_family")
    if got != family:
        raise CardError(f"asset card {card.name!r} is a {got!r} model, not a {family!r}")
    arch = card.get("model_arch")
    archs = ARCHS[family]
    if arch not in archs:
        raise CardError(
            f"asset card {card.name!r}: unknown {family} architecture {arch!r} "
            f"(known: {', '.join(archs)})"
        )
    config = dict(archs[str(arch)])
    for overrides in reversed(card.chain("model_config")):
        if not isinstance(overrides, Mapping):
            raise CardError(f"asset card {card.name!r}: model_config must be a mapping")
        config = merge_overrides(config, overrides)
    return config


def _need(card: Card, ok: bool, what: str) -> None:
    if not ok:
        raise CardError(f"asset card {card.name!r}: {what} is not supported by this runtime")


def _common(card: Card, cfg: dict[str, Any]) -> None:
    _need(card, cfg.get("activation_fn", "ReLU") == "ReLU", "an activation other than ReLU")
    _need(card, not cfg.get("no_scale_embedding"), "no_scale_embedding")
    _need(card, not cfg.get("no_token_positional_embeddings"), "no positional embeddings")
    _need(card, not cfg.get("learned_pos"), "learned positions")


def encoder_config(card: Card) -> TextModelConfig:
    """What `SonarTextEncoder` needs, from an encoder card."""
    cfg = card_config(card, ENCODER_FAMILY)
    _common(card, cfg)
    _need(card, cfg.get("pooling", "mean") == "mean", f"pooling {cfg.get('pooling')!r}")
    _need(card, cfg.get("embedding_dim") in (None, cfg["model_dim"]), "embedding_dim")
    pad = _pad_idx(card, cfg)
    max_len = int(cfg["max_seq_len"])
    if cfg.get("_from_fairseq"):
        max_len += pad + 1  # as sonar-space's encoder factory does for fairseq-trained models
    return TextModelConfig(
        model_dim=int(cfg["model_dim"]),
        num_layers=int(cfg["num_encoder_layers"]),
        num_heads=int(cfg["num_encoder_attn_heads"]),
        ffn_inner_dim=int(cfg["ffn_inner_dim"]),
        vocab_size=int(cfg["vocab_info"]["size"]),
        pad_idx=pad,
        max_seq_len=max_len,
    )


def decoder_config(card: Card) -> TextModelConfig:
    """What `SonarTextDecoder` needs, from a decoder card."""
    cfg = card_config(card, DECODER_FAMILY)
    _common(card, cfg)
    _need(card, cfg.get("input_dim") in (None, cfg["model_dim"]), "input_dim")
    return TextModelConfig(
        model_dim=int(cfg["model_dim"]),
        num_layers=int(cfg["num_decoder_layers"]),
        # sonar-space builds every decoder attention with the *encoder* head count.
        num_heads=int(cfg["num_encoder_attn_heads"]),
        ffn_inner_dim=int(cfg["ffn_inner_dim"]),
        vocab_size=int(cfg["vocab_info"]["size"]),
        pad_idx=_pad_idx(card, cfg),
        max_seq_len=int(cfg["max_seq_len"]),
    )


def _pad_idx(card: Card, cfg: dict[str, Any]) -> int:
    pad = cfg["vocab_info"].get("pad_idx")
    _need(card, pad is not None, "a vocabulary without pad_idx")
    return int(pad)
