"""Sentence-by-sentence generation for one request, with the reference semantics.

split → encode → model → (latent noise) → reverse_proj → decode → re-encode → EOS check →
append the re-encoded embedding → repeat. The per-step rules live here as small functions so the
batching engine applies exactly the same ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from models.options import (
    BEGIN_TEXT,
    DEFAULT_EOS_TEXT,
    DEFAULT_EOS_THRESHOLD,
    Finished,
    FinishReason,
    GenerationError,
    GenerationOptions,
    Prompt,
    Sentence,
    Usage,
)
from models.pipeline import SonarLLMPipeline
from models.sentences import split_sentences

__all__ = [  # the request types are re-exported: callers import them with the generator
    "BEGIN_TEXT",
    "DEFAULT_EOS_TEXT",
    "DEFAULT_EOS_THRESHOLD",
    "FinishReason",
    "Finished",
    "GenerationError",
    "GenerationOptions",
    "Prompt",
    "Sentence",
    "Usage",
    "add_latent_noise",
    "cut_at_stop",
    "eos_similarity",
    "generate",
    "prompt_sentences",
    "repeats_earlier",
    "summarization_instruction",
    "summarization_prompt",
]


# ----- the per-step rules (shared with the engine) -------------------------------------------
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


# ----- one request ---------------------------------------------------------------------------
def generate(
    pipe: SonarLLMPipeline,
    prompt: Prompt | None,
    options: GenerationOptions | None = None,
    prompt_embeddings: Tensor | None = None,
) -> Iterator[Sentence | Finished]:
    """Yield each sentence as soon as it is decoded, then one `Finished`.

    `prompt_embeddings` ([N, D] SONAR vectors) follow the text prompt's sentences (which may
    then be None): the model sees them as it sees encoded sentences."""
    opts = options or GenerationOptions()
    pipe.check_options(opts)
    start = time.perf_counter()
    add_begin = pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
    given = 0 if prompt_embeddings is None else int(prompt_embeddings.shape[0])
    if prompt_embeddings is not None and (
        prompt_embeddings.ndim != 2 or prompt_embeddings.shape[1] != pipe.codec.embed_dim
    ):
        raise GenerationError(
            "prompt_embeddings",
            f"must be rows of {pipe.codec.embed_dim} values, "
            f"got shape {list(prompt_embeddings.shape)}",
        )
    sentences = prompt_sentences(prompt, opts.source_lang, add_begin, given)
    usage = Usage(prompt_sentences=len(sentences) + given)
    context = pipe.encode_prompt(sentences, opts.source_lang, add_begin)
    if prompt_embeddings is not None:
        context = torch.cat([context, prompt_embeddings.to(context)])
    eos = pipe.eos_embedding(opts.eos_text)
    noise_rng = opts.latent_generator(pipe.model.device)
    # A cache of its own, sized for this request's whole life.
    cache = pipe.model.private_cache([len(context) + opts.max_sentences])
    cache.add(0)
    hidden = pipe.model.extend(cache, [0], [context])
    out: list[str] = []
    earlier: list[Tensor] = []  # the generated sentences' re-encoded embeddings
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
        if repeats_earlier(reencoded[0], earlier, opts.repetition_threshold):
            reason = "repetition"
            break
        text = decoded.text
        cut = cut_at_stop(text, opts.stop)
        if cut is not None:
            reason = "stop"
            if not cut:
                break
            text = cut
        if usage.time_to_first_sentence is None:
            usage.time_to_first_sentence = time.perf_counter() - start
        yield Sentence(len(out), text, decoded.num_tokens, reencoded[0])
        out.append(text)
        earlier.append(reencoded[0])
        if cut is not None:
            break
        if len(out) < opts.max_sentences:
            hidden = pipe.model.extend(cache, [0], [reencoded])
    usage.generated_sentences = len(out)
    usage.total_time = time.perf_counter() - start
    yield Finished(reason, out, usage)
