"""One model step at context 8, 64 and 512 sentences: KV cache vs full recomputation.

Goal (issue): with the cache, the step at 512 sentences costs under 1.5× the step at 8.

A random-weight SonarLLM in a released size layout is built directly from `SonarLLMConfig`.
For each context C:
  cached: `model.extend(cache, keys, [one embedding each])` on a paged cache holding C
          sentences per sequence (batch 1 and 16);
          the cache's length is reset to C before every call, so each call appends position C
  full:   `model.forward_hidden(ctx[:, :C + 1])` (batch 1), the authors' way to get the same
          hidden state: the whole context plus the new sentence, recomputed.
All measurements are interleaved round by round (after a warm-up), medians are reported; they
run on a worker thread, as the engine runs the model on its own thread.

    .venv/bin/python bench/kv_cache.py [--quick] [--size 100M] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    environment,
    fmt_ms,
    in_worker_thread,
    loadavg,
    median,
    percentile,
    print_header,
    pyplot,
    sync,
    write_json,
)

from models.config import SonarLLMConfig
from models.pipeline import resolve_device, resolve_dtype
from models.sonar_llm import SonarLLM

CONTEXTS = (8, 64, 512)
GOAL_RATIO = 1.5
EMBED_DIM = 1024

_LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# The released SonarLLM_{100M,300M,600M,900M}.json layouts (see docs/sonar-llm-facts.md).
SIZES: dict[str, dict[str, int]] = {
    "100M": dict(hidden=512, layers=8, heads=16, head_dim=32, ffn=2048),
    "300M": dict(hidden=1024, layers=10, heads=16, head_dim=64, ffn=4096),
    "600M": dict(hidden=1280, layers=16, heads=26, head_dim=64, ffn=5120),
    "900M": dict(hidden=1536, layers=17, heads=32, head_dim=64, ffn=6144),
}


def released_config(size: str) -> SonarLLMConfig:
    s = SIZES[size]
    return SonarLLMConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        head_dim=s["head_dim"],
        vocab_size=128256,
        rope_scaling=dict(_LLAMA3_ROPE),
        embed_dim=EMBED_DIM,
    )


def build_model(cfg: SonarLLMConfig, device: torch.device, dtype: torch.dtype) -> SonarLLM:
    """Random weights (PyTorch's default init); the RoPE buffer stays fp32 as loading keeps it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SonarLLM(cfg)
    model.to(device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


@dataclass
class Case:
    """One measured configuration and its samples (seconds)."""

    name: str  # "cached" or "full"
    context: int
    batch: int
    run: Callable[[], Any]
    samples: list[float] = field(default_factory=list)
    per_round: int = 1

    def time_once(self, device: torch.device) -> float:
        sync(device)
        t0 = time.perf_counter()
        self.run()
        sync(device)
        return time.perf_counter() - t0


def cached_case(
    model: SonarLLM, ctx: torch.Tensor, context: int, batch: int, emb: torch.Tensor
) -> Case:
    # `batch` sequences prefilled with the same context in one call; each run appends position
    # `context` to every sequence (one step) and takes it back (host bookkeeping only).
    keys = list(range(batch))
    cache = model.private_cache([context + 1] * batch)
    for k in keys:
        cache.add(k)
    model.extend(cache, keys, [ctx[0, :context]] * batch)
    steps = [emb[i : i + 1] for i in range(batch)]

    def run() -> torch.Tensor:
        hidden = model.extend(cache, keys, steps)
        cache.shrink(keys, [1] * batch)
        return hidden

    return Case("cached", context, batch, run)


def full_case(model: SonarLLM, ctx: torch.Tensor, context: int, batch: int) -> Case:
    window = ctx[:batch, : context + 1].contiguous()

    def run() -> torch.Tensor:
        return model.forward_hidden(window)[:, -1]

    return Case("full", context, batch, run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="100M")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--batch", type=int, default=16, help="the second cached batch size")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15)")
    ap.add_argument("--round-seconds", type=float, default=None, help="target seconds per case")
    ap.add_argument("--quick", action="store_true", help="a smoke run (well under a minute)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    round_seconds = args.round_seconds or (0.05 if args.quick else 0.25)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)

    print_header(
        f"KV cache vs full recomputation: one SonarLLM {args.size} step (random weights), "
        f"{device} {str(dtype).removeprefix('torch.')}"
    )
    print(
        "# cached = model.extend(cache holding C, one new embedding); full = "
        "model.forward_hidden(context[:C+1]) (the authors' way: whole context recomputed)"
    )
    print(
        f"# {rounds} interleaved rounds after a warm-up; each round runs every case about "
        f"{round_seconds}s; medians"
    )
    t_start = time.perf_counter()
    cfg = released_config(args.size)
    model = build_model(cfg, device, dtype)
    max_batch = max(1, args.batch)
    gen = torch.Generator().manual_seed(0)
    # Random inputs: their values do not change the time of a step.
    ctx = (torch.randn(max_batch, max(CONTEXTS) + 1, EMBED_DIM, generator=gen) * 0.02).to(device)
    emb = (torch.randn(max_batch, EMBED_DIM, generator=gen) * 0.02).to(device)

    cases: list[Case] = []
    for c in CONTEXTS:
        cases.append(cached_case(model, ctx, c, 1, emb))
        if max_batch > 1:
            cases.append(cached_case(model, ctx, c, max_batch, emb))
        cases.append(full_case(model, ctx, c, 1))

    def measure() -> None:
        # Warm-up (allocator, kernels), and a first estimate of each case's time.
        for case in cases:
            case.time_once(device)
            est = min(case.time_once(device) for _ in range(2))
            case.per_round = max(1, min(200, round(round_seconds / max(est, 1e-6))))
        for _ in range(rounds):
            for case in cases:
                case.samples.extend(case.time_once(device) for _ in range(case.per_round))

    load_before = loadavg()
    in_worker_thread(measure)  # where the engine runs the model
    load_after = loadavg()

    def med(name: str, c: int, b: int) -> float | None:
        for case in cases:
            if (case.name, case.context, case.batch) == (name, c, b):
                return median(case.samples)
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    print()
    hdr = f"{'context':>8} | {'cached b1 ms':>12} |"
    if max_batch > 1:
        hdr += f" {f'cached b{max_batch} ms':>13} | {'per row ms':>10} |"
    hdr += f" {'full b1 ms':>10} | {'full/cached b1':>14}"
    print(hdr)
    print("-" * len(hdr))
    rows: list[dict[str, Any]] = []
    for c in CONTEXTS:
        cb1, full = med("cached", c, 1), med("full", c, 1)
        line = f"{c:>8} | {fmt_ms(cb1):>12} |"
        row: dict[str, Any] = {"context": c, "cached_b1_s": cb1, "full_b1_s": full}
        if max_batch > 1:
            cbn = med("cached", c, max_batch)
            per_row = None if cbn is None else cbn / max_batch
            line += f" {fmt_ms(cbn):>13} | {fmt_ms(per_row):>10} |"
            row[f"cached_b{max_batch}_s"] = cbn
        r = ratio(full, cb1)
        line += f" {fmt_ms(full):>10} | {('-' if r is None else f'{r:.1f}x'):>14}"
        row["full_over_cached_b1"] = r
        rows.append(row)
        print(line)

    lo, hi = CONTEXTS[0], CONTEXTS[-1]
    cached_ratio = ratio(med("cached", hi, 1), med("cached", lo, 1))
    cached_ratio_bn = ratio(med("cached", hi, max_batch), med("cached", lo, max_batch))
    full_ratio = ratio(med("full", hi, 1), med("full", lo, 1))
    print()
    print(f"cached step {hi}/{lo} (batch 1):  {cached_ratio:.2f}x")
    if max_batch > 1 and cached_ratio_bn is not None:
        print(f"cached step {hi}/{lo} (batch {max_batch}): {cached_ratio_bn:.2f}x")
    print(f"full recompute {hi}/{lo} (batch 1): {full_ratio:.2f}x")
    for row in rows:
        print(f"full/cached at C={row['context']} (batch 1): {row['full_over_cached_b1']:.1f}x")
    passed = cached_ratio is not None and cached_ratio < GOAL_RATIO
    print(
        f"\n{'PASS' if passed else 'FAIL'}: cached step {hi}/{lo} = {cached_ratio:.2f}x "
        f"(goal < {GOAL_RATIO}x, batch 1)"
    )
    print(f"# load average before/after the timed rounds: {load_before} / {load_after}")

    result = {
        "benchmark": "kv_cache",
        "environment": environment(),
        "size": args.size,
        "config": cfg.to_json_dict(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "rounds": rounds,
        "loadavg_before_after": [load_before, load_after],
        "rows": rows,
        "cases": [
            {
                "name": c.name,
                "context": c.context,
                "batch": c.batch,
                "n": len(c.samples),
                "median_s": median(c.samples),
                "p10_s": percentile(c.samples, 10),
                "p90_s": percentile(c.samples, 90),
            }
            for c in cases
        ],
        "ratios": {
            f"cached_{hi}_over_{lo}_b1": cached_ratio,
            f"cached_{hi}_over_{lo}_b{max_batch}": cached_ratio_bn,
            f"full_{hi}_over_{lo}_b1": full_ratio,
            **{f"full_over_cached_b1_at_{r['context']}": r["full_over_cached_b1"] for r in rows},
        },
        "goal": {"cached_ratio_below": GOAL_RATIO, "batch": 1, "passed": passed},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out: Path = args.out
    write_json(out / "kv_cache.json", result)
    plot(cases, max_batch, args.size, str(device), result["dtype"], out / "kv_cache.png")
    print(f"wrote {out / 'kv_cache.json'} and {out / 'kv_cache.png'}")
    return 0


def plot(cases: list[Case], batch: int, size: str, device: str, dtype: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("cached", 1, "o-"), ("full", 1, "^--")]
    if batch > 1:
        series.insert(1, ("cached", batch, "s-"))
    for name, b, style in series:
        pts = [
            (c.context, median(c.samples))
            for c in cases
            if (c.name, c.batch) == (name, b) and c.samples
        ]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        label = f"{'KV cache step' if name == 'cached' else 'full recompute'}, batch {b}"
        ax.plot(xs, [y * 1e3 for y in ys if y is not None], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(CONTEXTS), [str(c) for c in CONTEXTS])
    ax.set_xlabel("context (sentences)")
    ax.set_ylabel("median time per step (ms)")
    ax.set_title(f"SonarLLM {size} (random weights), {device} {dtype}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
