"""The per-step rules of sentence-by-sentence generation, with the reference semantics.

split → encode → model → (latent noise) → reverse_proj → decode → re-encode → EOS check →
append the re-encoded embedding → repeat. The engine runs that loop (for the server and the
offline `server.engine.LLM` alike); the rules it applies live here as small functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.options import (
    BEGIN_TEXT,
    DEFAULT_EOS_TEXT,
    DEFAULT_EOS_THRESHOLD,
    FinishReason,
    GenerationError,
    GenerationOptions,
    Prompt,
    Usage,
)
from models.sentences import split_sentences

__all__ = [  # the request types are re-exported: callers import them with the rules
    "BEGIN_TEXT",
    "DEFAULT_EOS_TEXT",
    "DEFAULT_EOS_THRESHOLD",
    "FinishReason",
    "GenerationError",
    "GenerationOptions",
    "Prompt",
    "Usage",
    "add_latent_noise",
    "cut_at_stop",
    "eos_similarity",
    "prompt_sentences",
    "repeats_earlier",
    "summarization_instruction",
    "summarization_prompt",
]


def prompt_sentences(
    prompt: Prompt | None, lang: str, add_begin: bool, embeddings: int = 0
) -> list[str]:
    """The prompt's sentences as the model sees them (with "Begin of text." when configured).

    A string is split with Punkt; a list is taken as already split (chat turns, summarize).
    `embeddings`: how many given vectors follow the text; with some, the text may be empty.
    """
    if prompt is None:
        sentences = []
    elif isinstance(prompt, str):
        sentences = split_sentences(prompt, lang)
    else:
        sentences = [s.strip() for s in prompt if isinstance(s, str) and s.strip()]
    if not sentences and not embeddings:
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


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str | None:
    """`text` before the first stop string in it (stripped), or None when none occurs."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return text[: min(hits)].strip() if hits else None


def eos_similarity(embeddings: Tensor, eos: Tensor) -> Tensor:
    """Cosine similarity of each row with the EOS embedding (one for all rows, or one per row)."""
    eos = eos.float()
    return F.cosine_similarity(embeddings.float(), eos.reshape(-1, eos.shape[-1]), dim=-1)


def repeats_earlier(embedding: Tensor, earlier: list[Tensor], threshold: float | None) -> bool:
    """Whether `embedding` reaches cosine similarity `threshold` with one of the `earlier`
    generated sentences' embeddings (the repetition stop; never when `threshold` is None)."""
    if threshold is None or not earlier:
        return False
    sims = F.cosine_similarity(
        embedding.float().reshape(1, -1), torch.stack(earlier).float(), dim=-1
    )
    return bool(sims.max().item() >= threshold)
