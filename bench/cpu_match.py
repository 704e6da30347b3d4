"""`bench/gpu.py`'s fp32 check that needs no fairseq2: the same native code on the device and
on this machine's CPU, given the same inputs.

  encoder  max |Δ| of the sentence embeddings (the device's fp32 matmuls may use TF32);
  decoder  beam search over the same embeddings (computed once, on the CPU): text and token
           count per row, and the largest relative score difference.

On a CPU-only run both sides are the CPU: the phase still runs every step, and its verdict is
left open (`same_device`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from common import in_worker_thread, sync

from models.pipeline import SonarLLMPipeline
from models.sonar_codec import Decoded, DecodeOptions

LANG = "eng_Latn"


def timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds `fn` takes on a worker thread (queued device work included), and its result."""

    def run() -> tuple[float, Any]:
        sync(dev)
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        return time.perf_counter() - t0, out

    return in_worker_thread(run)


def _decodes(pipe: SonarLLMPipeline, points: torch.Tensor, opts: DecodeOptions) -> list[Decoded]:
    codec = pipe.codec
    return list(codec.decode(points.to(codec.device), LANG, opts))


def device_vs_cpu(
    pipe: SonarLLMPipeline,
    cpu: SonarLLMPipeline,
    sentences: Sequence[str],
    points: torch.Tensor,
    opts: DecodeOptions,
) -> dict[str, Any]:
    """`pipe` (fp32, the device) against `cpu` (fp32, the CPU) on `sentences` and on the
    embeddings `points` (CPU tensors)."""
    dev = pipe.codec.device
    theirs_emb = cpu.codec.encode(list(sentences), LANG)
    ours_emb = pipe.codec.encode(list(sentences), LANG).cpu()
    encoder_delta = float((ours_emb - theirs_emb).abs().max())
    _decodes(pipe, points[:1], opts)  # warm-up (kernels, allocator)
    t_dev, ours = timed(dev, functools.partial(_decodes, pipe, points, opts))
    t_cpu, theirs = timed(torch.device("cpu"), functools.partial(_decodes, cpu, points, opts))
    pairs = list(zip(ours, theirs, strict=True))
    same = [(o.text, o.num_tokens) == (t.text, t.num_tokens) for o, t in pairs]
    rel = max(abs(o.score - t.score) / max(abs(t.score), 1e-12) for o, t in pairs)
    lengths = [t.num_tokens for t in theirs]
    result = {
        "device": str(dev),
        "same_device": dev.type == "cpu",
        "sentences": len(sentences),
        "encoder_max_abs_diff": encoder_delta,
        "rows": len(pairs),
        "identical_rows": sum(same),
        "identical_share": sum(same) / len(pairs),
        "max_score_rel_diff": rel,
        "tokens": sum(lengths),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "device_s": t_dev,
        "cpu_s": t_cpu,
        "examples": [{"device": o.text, "cpu": t.text} for o, t in pairs if o.text != t.text][:2],
    }
    result["passed"] = None if result["same_device"] else all(same)
    print(
        f"  encoder max |Δ| {encoder_delta:.1e} over {len(sentences)} sentences; decoder "
        f"{sum(same)}/{len(pairs)} rows identical (max score rel diff {rel:.1e}; "
        f"{result['min_tokens']}-{result['max_tokens']} tokens a row); {dev} {t_dev:.2f} s, "
        f"cpu {t_cpu:.2f} s",
        flush=True,
    )
    return result
