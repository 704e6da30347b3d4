"""What a generation request asks for and what it gets back: the types every layer shares.

A leaf module (no model code): `models.generate`, `models.pipeline`, the engine and the HTTP
layer all import from here, and nothing here imports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from models.errors import GenerationError
from models.sonar_codec import DecodeOptions, sonar_languages

BEGIN_TEXT = "Begin of text."
DEFAULT_EOS_TEXT = "End of sequence."
DEFAULT_EOS_THRESHOLD = 0.98

# "repetition": a generated sentence repeated an earlier one (`repetition_threshold`).
FinishReason = Literal["stop", "length", "cancelled", "timeout", "error", "repetition"]
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
    # Generation ends at the first of these strings inside a generated sentence; the sentence
    # is cut before it (OpenAI's `stop`, matched within each sentence: the model's unit).
    stop: tuple[str, ...] = ()
    # Generation ends when a new sentence's re-encoded embedding reaches this cosine similarity
    # with an earlier generated sentence's (that sentence is not output). None: never (the
    # authors' loop has no such rule).
    repetition_threshold: float | None = None

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
        r = self.repetition_threshold
        if r is not None and (math.isnan(r) or not -1.0 <= r <= 1.0):
            raise GenerationError("repetition_threshold", f"must be in [-1, 1], got {r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop", "stop strings must be non-empty")

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> GenerationOptions:
        """Options from flat values named as in `OPTIONS` (None or absent: the default)."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = set(given) - {o.name for o in OPTIONS}
        if unknown:
            raise ValueError(f"not generation options: {sorted(unknown)}")
        decode_names = {o.name for o in OPTIONS if o.decode}
        decode = DecodeOptions(**{k: v for k, v in given.items() if k in decode_names})
        rest = {k: v for k, v in given.items() if k not in decode_names}
        if "stop" in rest:
            rest["stop"] = (rest["stop"],) if isinstance(rest["stop"], str) else tuple(rest["stop"])
        return cls(decode=decode, **rest)

    def values(self) -> dict[str, Any]:
        """The flat values `from_values` takes (the inverse)."""
        out = {o.name: getattr(self.decode, o.name, None) for o in OPTIONS if o.decode}
        out.update({o.name: getattr(self, o.name) for o in OPTIONS if not o.decode})
        out["stop"] = list(self.stop)
        return out

    def with_seed(self, seed: int) -> GenerationOptions:
        """The same options with another seed (an independent, reproducible sample)."""
        return replace(self, seed=seed % (2**63))

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


LANG_PATTERN = r"^[a-z]{3}_[A-Z][a-z]{3}$"


@dataclass(frozen=True)
class Option:
    """One generation option as every interface shows it: the HTTP schemas (native fields and
    OpenAI extras), the CLI flags and the docs are all made from `OPTIONS`; the defaults are
    read from `GenerationOptions` / `DecodeOptions`, where the generator uses them."""

    name: str
    type: type
    description: str
    decode: bool = False  # a `DecodeOptions` field (else a `GenerationOptions` one)
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    many: bool = False  # a string or a list of strings (stop)
    max_items: int | None = None

    @property
    def default(self) -> Any:
        source = DecodeOptions if self.decode else GenerationOptions
        f = {f.name: f for f in fields(source)}[self.name]
        return f.default_factory() if callable(f.default_factory) else f.default

    def bounds(self) -> dict[str, Any]:
        names = ("ge", "gt", "le", "min_length", "max_length", "pattern")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


OPTIONS: tuple[Option, ...] = (
    Option("max_sentences", int, "new sentences at most", ge=1),
    Option(
        "eos_threshold",
        float,
        "generation stops when a sentence's cosine similarity with eos_text reaches this",
        ge=-1,
        le=1,
    ),
    Option(
        "eos_text", str, "the end-of-sequence sentence (not output)", min_length=1, max_length=1000
    ),
    Option("source_lang", str, "the prompt's language (SONAR/NLLB code)", pattern=LANG_PATTERN),
    Option("target_lang", str, "the output's language (SONAR/NLLB code)", pattern=LANG_PATTERN),
    Option("beam_size", int, "SONAR decoder beam size", decode=True, ge=1, le=32),
    Option("max_tokens", int, "token bound per decoded sentence", decode=True, ge=3, le=512),
    Option(
        "temperature",
        float,
        "decoder token temperature; 0 = beam search",
        decode=True,
        ge=0,
        le=10,
    ),
    Option("top_p", float, "nucleus sampling (needs temperature > 0)", decode=True, gt=0, le=1),
    Option("top_k", int, "top-k sampling (needs temperature > 0)", decode=True, ge=1, le=100_000),
    Option(
        "latent_temperature",
        float,
        "noise on the predicted embedding, scaled by its RMS (the HF wrapper's sampling)",
        ge=0,
        le=10,
    ),
    Option("seed", int, "makes sampling reproducible", ge=0, le=2**63 - 1),
    Option(
        "repetition_threshold",
        float,
        "end (finish_reason repetition) when a new sentence's cosine similarity with an earlier "
        "generated sentence reaches this; that sentence is not output (default: off)",
        ge=-1,
        le=1,
    ),
    Option(
        "stop",
        str,
        "end at the first of these strings inside a generated sentence (cut before it)",
        many=True,
        max_items=4,
        min_length=1,
        max_length=200,
    ),
)
OPTION = {o.name: o for o in OPTIONS}


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
