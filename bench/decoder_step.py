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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, RESULTS_DIR, environment, print_header, run_worker, write_json

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
    pipe = SonarLLMPipeline.load(bundle, device="cpu")
    codec = pipe.codec
    embs = codec.encode(SENTENCES, "eng_Latn")
    g = torch.Generator().manual_seed(0)
    pool = embs.repeat(20, 1) + 0.2 * embs.std() * torch.randn(
        20 * len(embs), embs.shape[1], generator=g
    )
    opts = DecodeOptions(beam_size=5, max_tokens=64)
    batch = codec.new_batch()
    counter = 0
    # The decoder's own arithmetic, timed apart: the overhead is the step's time minus it.
    stack = codec.decoder_stack
    forward = stack.forward
    in_forward = [0.0]

    def timed_forward(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return forward(*a, **kw)
        finally:
            in_forward[0] += time.perf_counter() - t

    stack.forward = timed_forward

    def top_up() -> None:
        nonlocal counter
        missing = beams - len(batch)
        reqs = []
        for _ in range(missing):
            reqs.append(codec.beam_request(counter, pool[counter % len(pool)], "eng_Latn", opts))
            counter += 1
        batch.add(reqs)

    spent = computing = 0.0
    rows = 0
    for i in range(warmup + steps):
        top_up()
        n = batch.num_rows
        in_forward[0] = 0.0
        t0 = time.perf_counter()
        batch.step()
        dt = time.perf_counter() - t0
        if i >= warmup:
            spent += dt
            computing += in_forward[0]
            rows += n
    return {
        "ms_per_step": 1000 * spent / steps,
        "overhead_ms_per_step": 1000 * (spent - computing) / steps,
        "mean_rows": rows / steps,
    }


def _run(root: Path, bundle: str, beams: int, steps: int, warmup: int) -> dict[str, float]:
    return run_worker(__file__, [bundle, beams, steps, warmup], root)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        bundle, beams, steps, warmup = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(_worker(bundle, beams, steps, warmup)))
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
    trees: dict[str, Path] = {"this tree": REPO_ROOT}
    made: list[Path] = []
    try:
        for ref in refs:
            tmp = Path(tempfile.mkdtemp(prefix=f"decoder-step-{ref}-"))
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(tmp), ref],
                cwd=REPO_ROOT,
                check=True,
                capture_output=True,
            )
            made.append(tmp)
            trees[ref] = tmp
        results: dict[str, Any] = {}
        for beams in [int(b) for b in args.beams.split(",")]:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for _ in range(args.rounds):  # alternate: drifts in machine load hit every side
                for name, root in trees.items():
                    runs[name].append(_run(root, str(bundle), beams, args.steps, 10))
            row: dict[str, Any] = {}
            for name, rs in runs.items():
                row[name] = {
                    "ms_per_step": statistics.median(r["ms_per_step"] for r in rs),
                    "overhead_ms_per_step": statistics.median(
                        r["overhead_ms_per_step"] for r in rs
                    ),
                    "mean_rows": statistics.median(r["mean_rows"] for r in rs),
                    "runs": rs,
                }
            mine = row["this tree"]
            for ref in refs:
                row[ref]["over_this_tree"] = row[ref]["ms_per_step"] / mine["ms_per_step"]
                row[ref]["overhead_over_this_tree"] = (
                    row[ref]["overhead_ms_per_step"] / mine["overhead_ms_per_step"]
                )
            results[str(beams)] = row
            parts = [
                f"{name} {row[name]['ms_per_step']:6.2f} ms "
                f"(overhead {row[name]['overhead_ms_per_step']:5.2f})"
                for name in trees
            ]
            print(
                f"  {beams:3d} beams × 5 (~{row['this tree']['mean_rows']:.0f} rows): "
                + " | ".join(parts),
                flush=True,
            )
    finally:
        for tmp in made:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tmp)],
                cwd=REPO_ROOT,
                check=False,
                capture_output=True,
            )
    write_json(
        RESULTS_DIR / "decoder_step.json",
        {"environment": environment(), "refs": refs, "steps": args.steps, "results": results},
    )


if __name__ == "__main__":
    main()
