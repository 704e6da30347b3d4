"""The decoder step: what one `DecodeBatch.step()` costs, with B beams (beam 5) kept running,
topped up as they finish, so that the batch holds about 5 × B rows.

As a script, on the tiny bundle, whose decoder does little arithmetic, so that most of a step is
the search's own overhead: the wall time of `step()` and, apart, the time inside the decoder's
forward (overhead = step - forward), on one thread, for this tree and earlier commits in
alternating processes (common.alternate).

    .venv/bin/python bench/decoder_step.py [--beams 16,64] [--refs 5707b04,58b9202] [--rounds 3]

Writes bench/results/decoder_step.json. For bench/gpu.py's decoder_step phase, `roofline` times
the step on the device and sets it against the device's roofline: its FLOPs and least memory
traffic counted from the decoder's shapes, the peak rates from the datasheets (`PEAKS`).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    alternate,
    environment,
    in_worker_thread,
    print_header,
    sync,
    write_json,
)

if TYPE_CHECKING:  # the worker imports the measured tree's own `models` (an earlier commit's)
    from models.decoder_stack import SonarDecoderStack
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions, SonarCodec

SENTENCES = [
    sentence.strip() + "."
    for sentence in (
        "The cat sat on the mat and watched the rain. Prices rose sharply last year. We walked to "
        "the station together. The committee will meet again on Monday. She opened the letter "
        "and read it twice. Rivers carry sand from the mountains to the sea. The new bridge took "
        "four years to build. He forgot his keys at the office. Scientists measured the "
        "temperature every hour. The concert ended late. Our team won the match in the final "
        "minute. The library closes early on Fridays. End of sequence. A small boat crossed the "
        "lake at dawn. Nobody knew where the old map had gone. Bread is cheaper in the morning."
    ).split(".")[:-1]
]


def check_embeddings(codec: SonarCodec, n: int, seed: int = 0) -> torch.Tensor:
    """n fixed embeddings: `SENTENCES` encoded, then points around them (the random decoder
    ends some encoded sentences early and runs noisy points long: lengths of every kind)."""
    base = codec.encode(SENTENCES, "eng_Latn").cpu()
    g = torch.Generator().manual_seed(seed)
    rows = [base[i % len(base)] for i in range(n)]
    for i in range(len(base), n):
        rows[i] = rows[i] + 0.3 * base.std() * torch.randn(base.shape[1], generator=g)
    return torch.stack(rows).to(codec.device)


# ----- the step loop --------------------------------------------------------------------------
@dataclass
class StepRun:
    """What `step_loop` saw in its timed steps (the warm-up steps are left out)."""

    step_s: list[float] = field(default_factory=list)  # wall time of each step, synchronised
    # Time inside the decoder's forward in each step. Not synchronised: on a GPU this is launch
    # time only; on a CPU step - forward is the search's own overhead.
    forward_s: list[float] = field(default_factory=list)
    calls: list[list[tuple[int, int]]] = field(default_factory=list)  # (rows, length) per forward
    warmup_s: float = 0.0  # the warm-up steps' wall time
    finished: dict[Hashable, list[int]] = field(default_factory=dict)  # key -> tokens

    @property
    def mean_rows(self) -> float:
        return sum(n for step in self.calls for n, _ in step) / max(1, len(self.step_s))


def step_loop(
    codec: SonarCodec, pool: torch.Tensor, beams: int, warmup: int, steps: int, opts: DecodeOptions
) -> StepRun:
    """`beams` beam searches (embeddings taken from `pool` in turn) kept running, topped up as
    they finish, for `warmup` + `steps` calls of `DecodeBatch.step()`, each timed between device
    syncs."""
    stack = codec.decoder_stack
    assert stack is not None
    dev = codec.device
    run = StepRun()
    inner = stack.forward
    calls: list[tuple[int, int]] = []
    in_forward = [0.0]

    def recorded(tokens: torch.Tensor, positions: torch.Tensor, length: int, *a: Any) -> Any:
        calls.append((int(tokens.shape[0]), int(length)))
        t = time.perf_counter()
        try:
            return inner(tokens, positions, length, *a)
        finally:
            in_forward[0] += time.perf_counter() - t

    try:  # a block manager holding every beam search at its longest
        from models.block_manager import BlockManager, blocks_for, page_bytes_for
    except ImportError:  # an earlier commit (e.g. 5707b04): its batch sizes its own pool
        batch = codec.new_batch()  # type: ignore[call-arg]
    else:
        position = stack.bytes_per_position()
        page = page_bytes_for([position])
        pages = beams * opts.beam_size * blocks_for(opts.max_tokens, page // position)
        batch = codec.new_batch(BlockManager(pages, page, dev))
    counter = 0
    stack.forward = recorded  # type: ignore[method-assign, assignment]
    t_start = time.perf_counter()
    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync(dev)
                run.warmup_s = time.perf_counter() - t_start
            missing = beams - len(batch)
            batch.add(
                [
                    codec.beam_request(k, pool[k % len(pool)], "eng_Latn", opts)
                    for k in range(counter, counter + missing)
                ]
            )
            counter += missing
            calls.clear()
            in_forward[0] = 0.0
            sync(dev)
            t0 = time.perf_counter()
            result = batch.step()
            sync(dev)
            dt = time.perf_counter() - t0
            run.finished.update((key, seq.tokens) for key, seq in result.finished)
            if i >= warmup:
                run.step_s.append(dt)
                run.forward_s.append(in_forward[0])
                run.calls.append(list(calls))
    finally:
        del stack.forward  # back to the class's method
    return run


# ----- device peaks ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Peak:
    """Dense peak rates from NVIDIA's datasheets (sparsity figures halved): TFLOP/s, TB/s."""

    name: str
    bf16: float
    tf32: float  # float32 matmuls under `set_float32_matmul_precision("high")`
    memory_tb_s: float


# Matched in order on the words of torch.cuda.get_device_name ('-' read as a space): the first
# entry whose words are all present. "NVIDIA H100 80GB HBM3" is the SXM part.
PEAKS: list[tuple[tuple[str, ...], Peak]] = [
    (("H100", "PCIE"), Peak("H100 PCIe", 756.0, 378.0, 2.0)),
    (("H100", "NVL"), Peak("H100 NVL", 835.0, 417.5, 3.9)),
    (("H100",), Peak("H100 SXM", 989.4, 494.7, 3.35)),
    (("H200", "NVL"), Peak("H200 NVL", 835.0, 417.5, 4.8)),
    (("H200",), Peak("H200 SXM", 989.4, 494.7, 4.8)),
    (("A100", "PCIE", "80GB"), Peak("A100 PCIe 80GB", 312.0, 156.0, 1.935)),
    (("A100", "PCIE"), Peak("A100 PCIe 40GB", 312.0, 156.0, 1.555)),
    (("A100", "80GB"), Peak("A100 SXM 80GB", 312.0, 156.0, 2.039)),
    (("A100",), Peak("A100 SXM 40GB", 312.0, 156.0, 1.555)),
    (("L40S",), Peak("L40S", 362.0, 183.0, 0.864)),
    (("L4",), Peak("L4", 121.0, 60.0, 0.3)),
    (("A10",), Peak("A10", 125.0, 62.5, 0.6)),
]


def device_peak(name: str | None) -> Peak | None:
    """The peak rates of the GPU called `name`; None for a CPU or a GPU not in `PEAKS`."""
    if not name:
        return None
    words = set(name.upper().replace("-", " ").split())
    return next((p for keys, p in PEAKS if all(k in words for k in keys)), None)


# ----- FLOPs and bytes of one decoder step ---------------------------------------------------
@dataclass(frozen=True)
class StepShapes:
    """What one `DecodeBatch.step()` computes per row, from the decoder's weights."""

    layers: int
    model_dim: int
    attn_width: int  # heads × head_dim
    vocab: int
    layer_weights: int  # q, k, v, output and FFN weights of all layers (elements)
    itemsize: int
    kv_bytes_per_position: int

    @classmethod
    def of(cls, stack: SonarDecoderStack) -> StepShapes:
        layer = 0
        for blk in stack.blocks:
            a: Any = blk.self_attn
            f: Any = blk.ffn
            projections = (a.q_proj, a.k_proj, a.v_proj, a.output_proj, f.inner_proj, f.output_proj)
            layer += sum(int(m.weight.numel()) for m in projections)
        return cls(
            layers=stack.num_layers,
            model_dim=stack.model_dim,
            attn_width=stack.num_heads * stack.head_dim,
            vocab=stack.vocab_size,
            layer_weights=layer,
            itemsize=stack.dtype.itemsize,
            kv_bytes_per_position=stack.bytes_per_position(),
        )

    def flops(self, rows: int, length: int) -> float:
        """Multiply-adds × 2 of one forward over `rows` rows attending over `length` positions:
        per layer the self-attention projections, scores and weighted sum, and the FFN; then
        the output projection over the vocabulary. (The cross-attention projections, computed
        once per beam when it joins, norms, softmaxes and the search are left out.)"""
        attention = 4 * length * self.attn_width * self.layers
        per_row = 2 * self.layer_weights + attention + 2 * self.vocab * self.model_dim
        return float(rows * per_row)

    def bytes(self, rows: int, length: int) -> float:
        """Least memory traffic of one step: every weight read once, every row's cached keys
        and values read once, the fp32 log-probabilities written once."""
        weights = (self.layer_weights + self.vocab * self.model_dim) * self.itemsize
        return float(weights + rows * length * self.kv_bytes_per_position + rows * self.vocab * 4)


def free_device_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def roofline(
    pipe: SonarLLMPipeline,
    pool: torch.Tensor,
    beam_counts: list[int],
    warmup: int,
    steps: int,
    opts: DecodeOptions,
    peak: Peak | None,
) -> dict[str, Any]:
    """bench/gpu.py's decoder_step phase: `step_loop` per beam count, with what its forwards
    computed (FLOPs, least bytes) and, where the device's peak is known, its roofline."""
    codec = pipe.codec
    assert codec.decoder_stack is not None
    shapes = StepShapes.of(codec.decoder_stack)
    # bf16 tensor cores; TF32 for fp32 (our decoder runs fp32 matmuls at precision "high").
    tflops = None if peak is None else peak.tf32 if codec.dtype == torch.float32 else peak.bf16
    runs = []
    for b in beam_counts:
        free_device_memory(codec.device)
        run = in_worker_thread(functools.partial(step_loop, codec, pool, b, warmup, steps, opts))
        calls = [call for step in run.calls for call in step]
        flops = sum(shapes.flops(n, length) for n, length in calls) / steps
        traffic = sum(shapes.bytes(n, length) for n, length in calls) / steps
        seconds = sum(run.step_s) / steps
        row = {
            "beams": b,
            "steps": steps,
            "mean_rows": run.mean_rows,
            "ms_per_step": 1e3 * seconds,
            "ms_per_step_median": 1e3 * statistics.median(run.step_s),
            "flops_per_step": flops,
            "bytes_per_step": traffic,
            "achieved_tflops": flops / seconds / 1e12,
            "warmup_s": run.warmup_s,
            "finished": len(run.finished),
        }
        note = f"{row['achieved_tflops'] * 1e3:.3g} GFLOP/s"
        if tflops is not None and peak is not None:
            least = max(flops / (tflops * 1e12), traffic / (peak.memory_tb_s * 1e12))
            row |= {
                "peak_tflops": tflops,
                "fraction_of_peak": row["achieved_tflops"] / tflops,
                "roofline_ms": least * 1e3,
                "over_roofline": seconds / least,
            }
            note += f", {seconds / least:.1f}x its roofline ({least * 1e3:.2f} ms)"
        runs.append(row)
        print(
            f"  {b:>3} beams (~{run.mean_rows:.0f} rows): {1e3 * seconds:.2f} ms a step (median "
            f"{row['ms_per_step_median']:.2f}), {flops / 1e9:.3g} GFLOP -> {note}",
            flush=True,
        )
    dtype = str(codec.dtype).removeprefix("torch.")
    return {"dtype": dtype, "shapes": asdict(shapes), "runs": runs}


# ----- this tree's step against earlier commits' ---------------------------------------------
def _worker(bundle: str, beams: int, steps: int, warmup: int) -> dict[str, float]:
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions

    # One thread: on a small shared CPU a thread pool's hand-offs, not the work, would dominate.
    torch.set_num_threads(1)
    codec = SonarLLMPipeline.load(bundle, device="cpu").codec
    pool = check_embeddings(codec, 240)
    run = step_loop(codec, pool, beams, warmup, steps, DecodeOptions(beam_size=5, max_tokens=64))
    spent, computing = sum(run.step_s), sum(run.forward_s)
    return {
        "ms_per_step": 1000 * spent / steps,
        "overhead_ms_per_step": 1000 * (spent - computing) / steps,
        "mean_rows": run.mean_rows,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        beams, steps, warmup = map(int, sys.argv[3:6])
        print(json.dumps(_worker(sys.argv[2], beams, steps, warmup)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beams", default="16,64", help="beams running at once (× beam 5 rows)")
    parser.add_argument("--refs", default="5707b04,58b9202", help="earlier commits to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    print_header("decoder step overhead: DecodeBatch.step() on the tiny bundle, beam 5")

    from models import tiny

    bundle = tiny.build(Path(tempfile.mkdtemp(prefix="decoder-step-bundle-"))).root
    refs = [r for r in args.refs.split(",") if r]
    results: dict[str, Any] = {}
    for beams in [int(b) for b in args.beams.split(",")]:
        worker: list[object] = [bundle, beams, args.steps, 10]
        results[str(beams)] = row = alternate(__file__, worker, refs, args.rounds)
        parts = [
            f"{name} {r['ms_per_step']:6.2f} ms (overhead {r['overhead_ms_per_step']:5.2f})"
            for name, r in row.items()
        ]
        rows = row["this tree"]["mean_rows"]
        print(f"  {beams:3d} beams × 5 (~{rows:.0f} rows): " + " | ".join(parts))
    write_json(
        RESULTS_DIR / "decoder_step.json",
        {"environment": environment(), "refs": refs, "steps": args.steps, "results": results},
    )


if __name__ == "__main__":
    main()
