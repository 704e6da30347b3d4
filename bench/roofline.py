"""The decoder step against the device: `DecodeBatch.step()` timed with `common.step_loop`, its
FLOPs and least memory traffic counted from the decoder's shapes, and set against the device's
peak rates and roofline (datasheet figures for the GPUs in `PEAKS`). bench/gpu.py's
decoder_step phase."""

from __future__ import annotations

import functools
import gc
import hashlib
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import in_worker_thread, step_loop

from models.decoder_stack import SonarDecoderStack
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions, SonarCodec


# ----- device peaks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Peak:
    """Dense peak rates from NVIDIA's datasheets (sparsity figures halved): TFLOP/s, TB/s."""

    name: str
    bf16: float
    tf32: float  # float32 matmuls under `set_float32_matmul_precision("high")`
    fp32: float  # no tensor cores
    memory_tb_s: float


# Matched in order on the words of torch.cuda.get_device_name ('-' read as a space): the first
# entry whose words are all present. "NVIDIA H100 80GB HBM3" is the SXM part.
PEAKS: list[tuple[tuple[str, ...], Peak]] = [
    (("H100", "PCIE"), Peak("H100 PCIe", 756.0, 378.0, 51.2, 2.0)),
    (("H100", "NVL"), Peak("H100 NVL", 835.0, 417.5, 60.0, 3.9)),
    (("H100",), Peak("H100 SXM", 989.4, 494.7, 66.9, 3.35)),
    (("H200", "NVL"), Peak("H200 NVL", 835.0, 417.5, 60.0, 4.8)),
    (("H200",), Peak("H200 SXM", 989.4, 494.7, 66.9, 4.8)),
    (("A100", "PCIE", "80GB"), Peak("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1.935)),
    (("A100", "PCIE"), Peak("A100 PCIe 40GB", 312.0, 156.0, 19.5, 1.555)),
    (("A100", "80GB"), Peak("A100 SXM 80GB", 312.0, 156.0, 19.5, 2.039)),
    (("A100",), Peak("A100 SXM 40GB", 312.0, 156.0, 19.5, 1.555)),
    (("L40S",), Peak("L40S", 362.0, 183.0, 91.6, 0.864)),
    (("L4",), Peak("L4", 121.0, 60.0, 30.3, 0.3)),
    (("A10",), Peak("A10", 125.0, 62.5, 31.2, 0.6)),
]


def device_peak(name: str | None) -> Peak | None:
    """The peak rates of the GPU called `name`; None for a CPU or a GPU not in `PEAKS`."""
    if not name:
        return None
    words = set(name.upper().replace("-", " ").split())
    return next((p for keys, p in PEAKS if all(k in words for k in keys)), None)


def peak_tflops(peak: Peak, dtype: torch.dtype) -> float:
    """The matmul peak that applies: bf16 tensor cores, TF32 for fp32 (SONAR's pipelines and
    our decoder run fp32 matmuls at precision "high")."""
    return peak.bf16 if dtype in (torch.bfloat16, torch.float16) else peak.tf32


# ----- FLOPs and bytes of one decoder step ---------------------------------------------------
def _numel(module: Any) -> int:
    return int(module.weight.numel())


@dataclass(frozen=True)
class StepShapes:
    """What one `DecodeBatch.step()` computes per row, from the decoder's weights."""

    layers: int
    model_dim: int
    attn_width: int  # heads × head_dim
    vocab: int
    layer_weights: int  # q, k, v, output and FFN weights of all layers (elements)
    cross_weights: int  # cross-attention v and output weights of all layers (elements)
    itemsize: int
    kv_bytes_per_position: int

    @classmethod
    def of(cls, stack: SonarDecoderStack) -> StepShapes:
        layer = cross = 0
        for blk in stack.blocks:
            a: Any = blk.self_attn
            f: Any = blk.ffn
            layer += sum(_numel(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.output_proj))
            layer += _numel(f.inner_proj) + _numel(f.output_proj)
            c: Any = blk.encoder_decoder_attn
            cross += _numel(c.v_proj) + _numel(c.output_proj)
        return cls(
            layers=stack.num_layers,
            model_dim=stack.model_dim,
            attn_width=stack.num_heads * stack.head_dim,
            vocab=stack.vocab_size,
            layer_weights=layer,
            cross_weights=cross,
            itemsize=stack.dtype.itemsize,
            kv_bytes_per_position=stack.bytes_per_position(),
        )

    def flops(self, rows: int, length: int) -> float:
        """Multiply-adds × 2 of one forward over `rows` rows attending over `length` positions:
        per layer the self-attention projections, scores and weighted sum, and the FFN; then
        the output projection over the vocabulary. (The cross-attention term is computed once
        per beam when it joins, `cross_flops`; norms, softmaxes and the search are left out.)"""
        attention = 4 * length * self.attn_width * self.layers
        per_row = 2 * self.layer_weights + attention + 2 * self.vocab * self.model_dim
        return float(rows * per_row)

    def cross_flops(self, beams: int) -> float:
        return float(2 * self.cross_weights * beams)

    def bytes(self, rows: int, length: int) -> float:
        """Least memory traffic of one step: every weight read once, every row's cached keys
        and values read once, the fp32 log-probabilities written once."""
        weights = (self.layer_weights + self.vocab * self.model_dim) * self.itemsize
        return float(weights + rows * length * self.kv_bytes_per_position + rows * self.vocab * 4)


def free_device_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----- phase: one decoder step -------------------------------------------------------------
def timed_steps(
    codec: SonarCodec,
    pool: torch.Tensor,
    beams: int,
    warmup: int,
    steps: int,
    opts: DecodeOptions,
    forward: Callable[..., torch.Tensor] | None,
) -> dict[str, Any]:
    """`common.step_loop`'s steps with what their forwards computed (FLOPs, least bytes)."""
    assert codec.decoder_stack is not None
    shapes = StepShapes.of(codec.decoder_stack)
    run = step_loop(codec, pool, beams, warmup, steps, opts, forward)
    calls = [call for step in run.calls for call in step]
    flops = sum(shapes.flops(n, length) for n, length in calls)
    traffic = sum(shapes.bytes(n, length) for n, length in calls)
    total = sum(run.step_s)
    return {
        "beams": beams,
        "steps": steps,
        "mean_rows": run.mean_rows,
        "ms_per_step": 1e3 * total / steps,
        "ms_per_step_min": 1e3 * min(run.step_s),
        # Robust to the odd slow step (a compiled forward recompiling for a new shape).
        "ms_per_step_median": 1e3 * statistics.median(run.step_s),
        "flops_per_step": flops / steps,
        "bytes_per_step": traffic / steps,
        "achieved_tflops": flops / total / 1e12,
        "beams_joined_per_step": run.joined / steps,
        "cross_flops_per_step": shapes.cross_flops(run.joined) / steps,
        "warmup_s": run.warmup_s,
        "finished": run.finished,
    }


def decoder_step(
    pipe: SonarLLMPipeline,
    pool: torch.Tensor,
    beam_counts: list[int],
    warmup: int,
    steps: int,
    opts: DecodeOptions,
    peak: Peak | None,
    compiled: bool,
) -> dict[str, Any]:
    codec = pipe.codec
    stack = codec.decoder_stack
    assert stack is not None
    dtype = codec.dtype
    forward = None
    if compiled:
        # Shapes change every step (rows come and go, the length grows): compile them dynamic.
        forward = torch.compile(stack.forward, dynamic=True)
    runs = []
    for b in beam_counts:
        free_device_memory(codec.device)
        run = in_worker_thread(
            functools.partial(timed_steps, codec, pool, b, warmup, steps, opts, forward)
        )
        finished = run.pop("finished")
        # What the timed loop decoded, to compare a compiled run's sentences with the eager one's.
        run["finished"] = len(finished)
        run["finished_digest"] = hashlib.sha1(repr(sorted(finished.items())).encode()).hexdigest()
        seconds = run["ms_per_step"] / 1e3
        if peak is not None:
            tflops = peak_tflops(peak, dtype)
            roofline = max(
                run["flops_per_step"] / (tflops * 1e12),
                run["bytes_per_step"] / (peak.memory_tb_s * 1e12),
            )
            run |= {
                "peak_tflops": tflops,
                "fraction_of_peak": run["achieved_tflops"] / tflops,
                "roofline_ms": roofline * 1e3,
                "over_roofline": seconds / roofline,
            }
        runs.append(run)
        rate = (
            f"{run['achieved_tflops']:.2f} TFLOP/s"
            if codec.device.type == "cuda"
            else f"{run['achieved_tflops'] * 1e3:.3g} GFLOP/s"
        )
        extra = (
            f", {100 * run['fraction_of_peak']:.1f}% of peak, {run['over_roofline']:.1f}x its "
            f"roofline ({run['roofline_ms']:.2f} ms)"
            if "roofline_ms" in run
            else ""
        )
        print(
            f"  {b:>3} beams (~{run['mean_rows']:.0f} rows): {run['ms_per_step']:.2f} ms a step "
            f"(median {run['ms_per_step_median']:.2f}; warm-up {run['warmup_s']:.1f} s), "
            f"{run['flops_per_step'] / 1e9:.3g} GFLOP -> {rate}{extra}",
            flush=True,
        )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compiled,
        "shapes": asdict(StepShapes.of(stack)),
        "runs": runs,
    }


def against_eager(compiled: dict[str, Any] | None, eager: dict[str, Any] | None) -> None:
    """Add to each compiled run its speed-up over the eager run of the same size (mean and
    median step), and whether the timed loop finished the same sentences."""
    if not compiled or not eager:
        return
    for run in compiled["runs"]:
        same = next((e for e in eager["runs"] if e["beams"] == run["beams"]), None)
        if same is not None:
            run["speedup_over_eager"] = same["ms_per_step"] / run["ms_per_step"]
            run["median_speedup_over_eager"] = (
                same["ms_per_step_median"] / run["ms_per_step_median"]
            )
            run["same_sentences_as_eager"] = same["finished_digest"] == run["finished_digest"]
