"""What one decoder step costs beyond its arithmetic: `DecodeBatch.step()` on the tiny bundle.

The tiny bundle's decoder does little arithmetic, so most of a step is the search's own overhead
(bookkeeping, host syncs, page tables). B beams (beam 5) run at once, topped up as they finish,
so the batch holds about 5 × B rows; over many steps the wall time of `step()` is measured, and
the time inside the decoder's forward apart: overhead = step - forward. One thread (on a small
shared CPU a thread pool's hand-offs, not the work, would dominate). The same worker runs
against this tree and against earlier commits (each checked out in a temporary worktree, run in
its own process with PYTHONPATH pointing at it), alternately, so all are measured in one run.

    .venv/bin/python bench/decoder_step.py [--beams 16,64] [--refs 5707b04,58b9202] [--rounds 3]

Writes bench/results/decoder_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    alternate,
    environment,
    print_header,
    run_worker,
    step_loop,
    write_json,
)

SENTENCES = [
    f"Sentence number {i} talks about {w} and what follows from it."
    for i, w in enumerate(
        "cats dogs rivers mountains trains music bread winter cities oceans books time".split()
    )
]


def _worker(bundle: str, beams: int, steps: int, warmup: int) -> dict[str, float]:
    import torch

    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions

    # One thread: on a small shared CPU a thread pool's hand-offs, not the work, would dominate.
    torch.set_num_threads(1)
    codec = SonarLLMPipeline.load(bundle, device="cpu").codec
    embs = codec.encode(SENTENCES, "eng_Latn")
    g = torch.Generator().manual_seed(0)
    pool = embs.repeat(20, 1) + 0.2 * embs.std() * torch.randn(
        20 * len(embs), embs.shape[1], generator=g
    )
    run = step_loop(codec, pool, beams, warmup, steps, DecodeOptions(beam_size=5, max_tokens=64))
    spent, computing = sum(run.step_s), sum(run.forward_s)
    return {
        "ms_per_step": 1000 * spent / steps,
        "overhead_ms_per_step": 1000 * (spent - computing) / steps,
        "mean_rows": run.mean_rows,
    }


def _median(runs: list[dict[str, float]]) -> dict[str, Any]:
    keys = ("ms_per_step", "overhead_ms_per_step", "mean_rows")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"runs": runs}


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

    bundle = Path(tempfile.mkdtemp(prefix="decoder-step-bundle-"))
    tiny.build(bundle)
    refs = [r for r in args.refs.split(",") if r]
    results: dict[str, Any] = {}
    for beams in [int(b) for b in args.beams.split(",")]:

        def measure(root: Path, beams: int = beams) -> dict[str, float]:
            # This script (and its bench/common.py) measures each tree's models/.
            return run_worker(__file__, [bundle, beams, args.steps, 10], root)

        row = {name: _median(rs) for name, rs in alternate(refs, args.rounds, measure).items()}
        mine = row["this tree"]
        for ref in refs:
            row[ref]["over_this_tree"] = row[ref]["ms_per_step"] / mine["ms_per_step"]
            row[ref]["overhead_over_this_tree"] = (
                row[ref]["overhead_ms_per_step"] / mine["overhead_ms_per_step"]
            )
        results[str(beams)] = row
        parts = [
            f"{name} {r['ms_per_step']:6.2f} ms (overhead {r['overhead_ms_per_step']:5.2f})"
            for name, r in row.items()
        ]
        print(f"  {beams:3d} beams × 5 (~{mine['mean_rows']:.0f} rows): " + " | ".join(parts))
    write_json(
        RESULTS_DIR / "decoder_step.json",
        {"environment": environment(), "refs": refs, "steps": args.steps, "results": results},
    )


if __name__ == "__main__":
    main()
