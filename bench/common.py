"""What the benchmarks share: where results go, the run's environment, timing helpers and the
old-vs-new harness (this tree against earlier commits)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(quick: bool) -> Path:
    """Where a run writes its results: a `--quick` smoke run's go to results/quick/ (ignored by
    git), so they never replace the figures the benchmarks page cites."""
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def print_header(title: str) -> None:
    env = environment()
    print(f"$ {env['command']}")
    print(f"# {title}")
    print(
        f"# torch {env['torch']} | {env['cpu_count']} CPUs, {env['torch_threads']} torch threads "
        f"| CUDA: {env['cuda_device'] or 'not present'} | load average {env['loadavg']} "
        f"| git {env['git_commit']}"
    )


def loadavg() -> list[float]:
    """1/5/15-minute load averages: other processes on the machine skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    git = ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]
    try:
        commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return {
        # The exact command that started this process (interpreter included).
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg": loadavg(),
        "git_commit": commit or None,
    }


def prepared(engine: Any, request: Any) -> Any:
    """`request` as `engine.submit` takes it: prepared (`Engine.prepare`), or as it is for an
    engine from before `prepare` (a `--baseline-ref` such as 37474ac took requests)."""
    prepare = getattr(engine, "prepare", None)
    return request if prepare is None else prepare(request)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_worker_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread, as the engine runs the model on its own thread: torch calls
    from the main thread can be several times slower when other processes load the CPU (OpenMP's
    workers spin there), so timings compare like with like only on equal threads."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-worker") as pool:
        return pool.submit(fn).result()


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def metrics(text: str, label: str) -> dict[str, float]:
    """Prometheus text -> {name: value} summed over labels, and {name{label's value}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            keys = [s.name, *([f"{s.name}{{{s.labels[label]}}}"] if label in s.labels else [])]
            for key in keys:
                out[key] = out.get(key, 0.0) + s.value
    return out


def run_worker(script: str, args: Sequence[object], root: Path = REPO_ROOT) -> dict[str, Any]:
    """Run `script --worker ARGS` in a fresh process with `root` first on its path (this tree,
    or an earlier commit's worktree) and return the JSON object its last output line holds."""
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, script, "--worker", *map(str, args)]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} in {root} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def alternate(script: str, args: Sequence[object], refs: Sequence[str], rounds: int) -> Any:
    """`run_worker(script, args)` for this tree ("this tree") and each git ref, `rounds` times
    in turn, so that drifts in the machine's load hit every side alike; each ref is checked out
    in a temporary worktree, removed at the end. Per tree: its runs ("runs") and the median of
    each of their numeric figures."""
    trees: dict[str, Path] = {"this tree": REPO_ROOT}
    try:
        for ref in refs:
            tmp = Path(tempfile.mkdtemp(prefix=f"bench-{ref}-"))
            git = ["git", "worktree", "add", "--detach", str(tmp), ref]
            subprocess.run(git, cwd=REPO_ROOT, check=True, capture_output=True)
            trees[ref] = tmp
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, root in trees.items():
                runs[name].append(run_worker(script, args, root))
        numeric = [k for k, v in runs["this tree"][0].items() if isinstance(v, int | float)]
        return {
            name: {"runs": rs} | {k: statistics.median(r[k] for r in rs) for k in numeric}
            for name, rs in runs.items()
        }
    finally:
        for name, root in trees.items():
            if name != "this tree":
                git = ["git", "worktree", "remove", "--force", str(root)]
                subprocess.run(git, cwd=REPO_ROOT, check=False, capture_output=True)
