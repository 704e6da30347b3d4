"""Sentence-by-sentence generation for one request, with the reference semantics.

split → encode → model → (latent noise) → reverse_proj → decode → re-encode → EOS check →
append the re-encoded embedding → repeat. The per-step rules live here as small functions so the
batching engine applies exactly the same ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.errors import GenerationError
from models.sentences import split_sentences
from models.sonar_codec import DecodeOptions, sonar_languages

if TYPE_CHECKING:
    from models.pipeline import SonarLLMPipeline

BEGIN_TEXT = "Begin of text."
DEFAULT_EOS_TEXT = "End of sequence."
DEFAULT_EOS_THRESHOLD = 0.98

__all__ = ["GenerationError"]  # re-exported: callers import it with the options

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


# ----- the per-step rules (shared with the engine) -------------------------------------------
def prompt_sentences(prompt: Prompt, lang: str, add_begin: bool) -> list[str]:
    """The prompt's sentences as the model sees them (with "Begin of text." when configured).

    A string is split with Punkt; a list is taken as already split (chat turns, summarize).
    """
    if isinstance(prompt, str):
        sentences = split_sentences(prompt, lang)
    else:
        sentences = [s.strip() for s in prompt if isinstance(s, str) and s.strip()]
    if not sentences:
        raise GenerationError("prompt", "must contain at least one non-whitespace character")
    return [BEGIN_TEXT, *sentences] if add_begin else sentences


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def summarization_instruction(num_sentences: int) -> str:
    """The paper's instruction sentence, e.g. "Text summarization in one sentence only."."""
    n = _NUMBER_WORDS[num_sentences] if num_sentences < len(_NUMBER_WORDS) else str(num_sentences)
    return f"Text summarization in {n} sentence{'s' if num_sentences != 1 else ''} only."


def summarization_prompt(
    document: str, num_sentences: int = 1, instruction: str | None = None, lang: str = "eng_Latn"
) -> list[str]:
    """The document's sentences followed by the instruction sentence (paper, Table 2)."""
    if not isinstance(document, str) or not document.strip():
        raise GenerationError("document", "must contain at least one non-whitespace character")
    if num_sentences < 1:
        raise GenerationError("num_sentences", f"must be a positive integer, got {num_sentences}")
    text = summarization_instruction(num_sentences) if instruction is None else instruction.strip()
    if not text:
        raise GenerationError("instruction", "must not be empty")
    return [*split_sentences(document, lang), text]


def add_latent_noise(
    hidden: Tensor, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """Noise in a random direction, scaled by rms(hidden) × temperature (HF wrapper's rule)."""
    if temperature == 0 or generator is None:
        return hidden
    noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
    rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt().to(hidden.dtype)
    return hidden + noise * rms * temperature


def eos_similarity(embeddings: Tensor, eos: Tensor) -> Tensor:
    """Cosine similarity of each row with the EOS embedding (one for all rows, or one per row)."""
    eos = eos.float()
    return F.cosine_similarity(embeddings.float(), eos.reshape(-1, eos.shape[-1]), dim=-1)


# ----- one request ---------------------------------------------------------------------------
def generate(
    pipe: SonarLLMPipeline, prompt: Prompt, options: GenerationOptions | None = None
) -> Iterator[Sentence | Finished]:
    """Yield each sentence as soon as it is decoded, then one `Finished`."""
    opts = options or GenerationOptions()
    pipe.check_options(opts)
    start = time.perf_counter()
    add_begin = pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
    sentences = prompt_sentences(prompt, opts.source_lang, add_begin)
    usage = Usage(prompt_sentences=len(sentences))
    context = pipe.encode_prompt(sentences, opts.source_lang, add_begin)
    eos = pipe.eos_embedding(opts.eos_text)
    noise_rng = opts.latent_generator(pipe.model.device)
    hidden, cache = pipe.model.prefill([context])
    out: list[str] = []
    reason: FinishReason = "length"
    while len(out) < opts.max_sentences:
        hidden = add_latent_noise(hidden, opts.latent_temperature, noise_rng)
        predicted = pipe.model.project(hidden)
        decoded = pipe.codec.decode(predicted, opts.target_lang, opts.decode_for(len(out)))[0]
        usage.decoded_tokens += decoded.num_tokens
        reencoded = pipe.codec.encode([decoded.text], opts.target_lang)
        if eos_similarity(reencoded, eos).item() >= opts.eos_threshold:
            reason = "stop"
            break
        if usage.time_to_first_sentence is None:
            usage.time_to_first_sentence = time.perf_counter() - start
        yield Sentence(len(out), decoded.text, decoded.num_tokens, reencoded[0])
        out.append(decoded.text)
        if len(out) < opts.max_sentences:
            hidden = pipe.model.step(cache, reencoded)
    usage.generated_sentences = len(out)
    usage.total_time = time.perf_counter() - start
    yield Finished(reason, out, usage)
