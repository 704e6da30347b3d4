"""One model step at context 8, 64 and 512 sentences: KV cache vs full recomputation.

A random-weight SonarLLM in a released layout. For each context C, `cached` is
`model.extend(cache, keys, [one embedding each])` on a paged cache holding C sentences per
sequence (batch 1 and 16; reset to C after every call), `full` is `model.forward_hidden(ctx[:,
:C + 1])` (batch 1), the authors' way to the same hidden state. Interleaved rounds after a
warm-up, on a worker thread as in the engine; medians.

    .venv/bin/python bench/kv_cache.py [--quick] [--size 100m] [--device cpu] [--dtype float32]

Prints the median step per case and context, and each case's step at 512 over its step at 8.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    environment,
    in_worker_thread,
    loadavg,
    percentile,
    print_header,
    results_dir,
    sync,
    write_json,
)

from models import tiny
from models.config import SonarLLMConfig
from models.pipeline import resolve_device, resolve_dtype
from models.sonar_llm import SonarLLM

CONTEXTS = (8, 64, 512)
EMBED_DIM = tiny.SONAR_DIM


def build_model(cfg: SonarLLMConfig, device: torch.device, dtype: torch.dtype) -> SonarLLM:
    """Random weights (PyTorch's default init); the RoPE buffer stays fp32 as loading keeps it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SonarLLM(cfg)
    for p in model.to(device).parameters():
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
    keys: list[Hashable] = list(range(batch))
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


def build_cases(model: SonarLLM, device: torch.device, batch: int) -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    # Random inputs: their values do not change the time of a step.
    ctx = (torch.randn(batch, max(CONTEXTS) + 1, EMBED_DIM, generator=gen) * 0.02).to(device)
    emb = (torch.randn(batch, EMBED_DIM, generator=gen) * 0.02).to(device)
    cases: list[Case] = []
    for c in CONTEXTS:
        cases.append(cached_case(model, ctx, c, 1, emb))
        if batch > 1:
            cases.append(cached_case(model, ctx, c, batch, emb))
        cases.append(full_case(model, ctx, c, 1))
    return cases


def measure(cases: list[Case], device: torch.device, rounds: int, round_seconds: float) -> None:
    """A warm-up (allocator, kernels) and a first estimate of each case's time, then `rounds`
    rounds, each running every case for about `round_seconds`."""
    for case in cases:
        case.time_once(device)
        est = min(case.time_once(device) for _ in range(2))
        case.per_round = max(1, min(200, round(round_seconds / max(est, 1e-6))))
    for _ in range(rounds):
        for case in cases:
            case.samples.extend(case.time_once(device) for _ in range(case.per_round))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(tiny.RELEASED_LLMS), default="100m")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--batch", type=int, default=16, help="the second cached batch size")
    ap.add_argument("--quick", action="store_true", help="a smoke run (well under a minute)")
    args = ap.parse_args(argv)
    rounds, round_seconds = (3, 0.05) if args.quick else (15, 0.25)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    print_header(f"KV cache vs full recomputation: one SonarLLM {args.size} step, {device} {dtype}")
    print(
        f"# cached = model.extend(cache holding C, one new embedding); full = "
        f"model.forward_hidden(context[:C+1]); {rounds} interleaved rounds, medians"
    )
    cfg = tiny.RELEASED_LLMS[args.size]  # a released layout
    cases = build_cases(build_model(cfg, device, dtype), device, max(1, args.batch))
    load_before = loadavg()
    in_worker_thread(lambda: measure(cases, device, rounds, round_seconds))
    medians = {(c.name, c.context, c.batch): percentile(c.samples, 50) or 0.0 for c in cases}
    print(f"\n{'case':>12}" + "".join(f"{f'C={c} ms':>11}" for c in CONTEXTS) + f"{'ratio':>8}")
    ratios = {}
    for name, b in dict.fromkeys((c.name, c.batch) for c in cases):
        ms = [medians[(name, c, b)] * 1e3 for c in CONTEXTS]
        ratios[f"{name}_b{b}_{CONTEXTS[-1]}_over_{CONTEXTS[0]}"] = ms[-1] / ms[0]
        label = f"{name} b{b}"
        print(f"{label:>12}" + "".join(f"{x:>11.2f}" for x in ms) + f"{ms[-1] / ms[0]:>7.2f}x")
    cases_out = [
        {"name": c.name, "context": c.context, "batch": c.batch, "n": len(c.samples)}
        | {f"p{q}_s": percentile(c.samples, q) for q in (10, 50, 90)}
        for c in cases
    ]
    result: dict[str, Any] = {
        "environment": environment(),
        "settings": vars(args) | {"rounds": rounds},
    }
    result |= {"config": cfg.to_json_dict(), "loadavg_before_after": [load_before, loadavg()]}
    write_json(
        results_dir(args.quick) / "kv_cache.json", result | {"ratios": ratios, "cases": cases_out}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
