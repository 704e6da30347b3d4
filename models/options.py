"""What a generation request asks for and what it gets back: the types every layer shares.

A leaf module (no model code): `models.generate`, `models.pipeline`, the engine and the HTTP
layer all import from here, and nothing here imports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from models.errors import GenerationError
from models.sonar_codec import DecodeOptions, sonar_languages

BEGIN_TEXT = "Begin of text."
DEFAULT_EOS_TEXT = "End of sequence."
DEFAULT_EOS_THRESHOLD = 0.98

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]
Prompt = str | list[str]


@dataclass(frozen=True)
class GenerationOptions:
    """What a request may set. Defaults reproduce the authors' loop (beam 5, greedy latent)."""

    max_sentences: int = 8
    eos_threshold: float = DEFAULT_EOS_THRESHOLD
    eos_text: str = DEFAULT_EOS_TEXT
    source_lang: str = "eng_Latn"
    target_lang: str = "eng_Latn"
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    latent_temperature: float = 0.0
    seed: int | None = None
    add_begin: bool | None = None  # None: as the model's config says

    def __post_init__(self) -> None:
        if not isinstance(self.max_sentences, int) or self.max_sentences < 1:
            raise GenerationError(
                "max_sentences", f"must be a positive integer, got {self.max_sentences!r}"
            )
        if not (-1.0 <= self.eos_threshold <= 1.0) or math.isnan(self.eos_threshold):
            raise GenerationError("eos_threshold", f"must be in [-1, 1], got {self.eos_threshold}")
        if not self.eos_text.strip():
            raise GenerationError("eos_text", "must not be empty")
        for name in ("source_lang", "target_lang"):
            lang = getattr(self, name)
            if lang not in sonar_languages():
                raise GenerationError(
                    name, f"unknown language {lang!r}: use a SONAR/NLLB code such as eng_Latn"
                )
        if self.latent_temperature < 0 or math.isnan(self.latent_temperature):
            raise GenerationError(
                "latent_temperature", f"must be >= 0, got {self.latent_temperature}"
            )

    def decode_for(self, index: int) -> DecodeOptions:
        """Decoder options for sentence `index`: each sampled sentence gets its own seed."""
        if not self.decode.sampling or self.seed is None:
            return self.decode
        return replace(self.decode, seed=(self.seed * 1_000_003 + index) % (2**63))

    def latent_generator(self, device: torch.device) -> torch.Generator | None:
        """A private RNG for latent noise, so a seeded request ignores its batch mates."""
        if self.latent_temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


@dataclass(frozen=True)
class Sentence:
    index: int
    text: str
    num_tokens: int
    embedding: Tensor | None = None  # the re-encoded embedding that joins the context


@dataclass
class Usage:
    prompt_sentences: int = 0
    generated_sentences: int = 0
    decoded_tokens: int = 0
    queue_time: float = 0.0
    time_to_first_sentence: float | None = None
    total_time: float = 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_sentences": self.prompt_sentences,
            "generated_sentences": self.generated_sentences,
            "decoded_tokens": self.decoded_tokens,
            "queue_time": round(self.queue_time, 6),
            "time_to_first_sentence": (
                None
                if self.time_to_first_sentence is None
                else round(self.time_to_first_sentence, 6)
            ),
            "total_time": round(self.total_time, 6),
        }


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    sentences: list[str]
    usage: Usage
    error: str | None = None
