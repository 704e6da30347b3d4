"""The authors' generation loop, kept as the baseline for tests and benchmarks (bench/engine.py
and bench/gpu.py import it from here).

No KV cache (the whole context is recomputed for every sentence), batch 1, one embedding per
decode call. Deterministic settings only: it is what the optimised paths must reproduce.
"""

from __future__ import annotations

import torch

from models.generate import GenerationOptions, Prompt, eos_similarity, prompt_sentences
from models.pipeline import SonarLLMPipeline


def reference_generate(
    pipe: SonarLLMPipeline, prompt: Prompt, options: GenerationOptions | None = None
) -> tuple[list[str], str]:
    """Sentences and finish reason ("stop" or "length"), computed the straightforward way."""
    opts = options or GenerationOptions()
    add_begin = pipe.model.config.add_begin if opts.add_begin is None else opts.add_begin
    sentences = prompt_sentences(prompt, opts.source_lang, add_begin)
    context = pipe.encode_prompt(sentences, opts.source_lang, add_begin)
    eos = pipe.eos_embedding(opts.eos_text)
    out: list[str] = []
    while len(out) < opts.max_sentences:
        hidden = pipe.model.forward_hidden(context[None])[0, -1]
        predicted = pipe.model.project(hidden[None])
        # fairseq2's own generator where the backend has it (the reference), else ours at batch 1.
        fairseq2 = pipe.codec.reference is not None
        text = pipe.codec.decode(predicted, opts.target_lang, opts.decode, use_fairseq2=fairseq2)[
            0
        ].text
        reencoded = pipe.codec.encode([text], opts.target_lang)
        if eos_similarity(reencoded, eos).item() >= opts.eos_threshold:
            return out, "stop"
        out.append(text)
        context = torch.cat([context, reencoded.to(context.dtype)])
    return out, "length"
