"""What the benchmarks share: where results go, the run's environment, timing helpers, the
`DecodeBatch` step loop and the old-vs-new harness (this tree against earlier commits)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from models.sonar_codec import DecodeOptions, SonarCodec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def command_line() -> str:
    """The exact command that started this process (interpreter included)."""
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def print_header(title: str) -> None:
    print(f"$ {command_line()}")
    print(f"# {title}")
    env = environment()
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
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "command": command_line(),
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


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_worker_thread(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread, as the engine runs the model on its own thread.

    Torch calls from the main thread can be several times slower when other processes load the
    CPU (OpenMP's workers spin there), so timings compare like with like only on equal threads.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="bench-worker")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50.0)


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def proc_status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile,
    ...), in bytes. Linux only."""
    out = {}
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[key] = int(value.split()[0]) * 1024
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


@dataclass
class StepRun:
    """What `step_loop` saw in its timed steps (the warm-up steps are left out)."""

    step_s: list[float] = field(default_factory=list)  # wall time of each step, synchronised
    # Time inside the decoder's forward in each step. Not synchronised: on a GPU this is launch
    # time only; on a CPU step - forward is the search's own overhead.
    forward_s: list[float] = field(default_factory=list)
    calls: list[list[tuple[int, int]]] = field(default_factory=list)  # (rows, length) per forward
    joined: int = 0  # beams that joined during the timed steps
    warmup_s: float = 0.0  # the warm-up steps' wall time (a compiled forward compiles there)
    finished: dict[Hashable, list[int]] = field(default_factory=dict)  # key -> tokens

    @property
    def mean_rows(self) -> float:
        return sum(n for step in self.calls for n, _ in step) / max(1, len(self.step_s))


def decoder_pool(codec: SonarCodec, beams: int, opts: DecodeOptions) -> Any:
    """A block manager holding `beams` beam searches of `opts` at their longest (built with the
    measured tree's own `models`)."""
    from models.block_manager import BlockManager, blocks_for, page_bytes_for

    position = codec.decoder_stack.bytes_per_position()
    page = page_bytes_for([position])
    pages = beams * opts.beam_size * blocks_for(opts.max_tokens, page // position)
    return BlockManager(pages, page, codec.device)


def step_loop(
    codec: SonarCodec,
    pool: torch.Tensor,
    beams: int,
    warmup: int,
    steps: int,
    opts: DecodeOptions,
    forward: Callable[..., torch.Tensor] | None = None,
) -> StepRun:
    """`beams` beam searches (embeddings taken from `pool` in turn) kept running, topped up as
    they finish, for `warmup` + `steps` calls of `DecodeBatch.step()`; the decoder runs through
    `forward` if given (e.g. a compiled one). Each step is timed between device syncs."""
    stack = codec.decoder_stack
    assert stack is not None
    dev = codec.device
    run = StepRun()
    inner = forward or stack.forward
    calls: list[tuple[int, int]] = []
    in_forward = [0.0]

    def recorded(tokens: torch.Tensor, positions: torch.Tensor, length: int, *a: Any) -> Any:
        calls.append((int(tokens.shape[0]), int(length)))
        t = time.perf_counter()
        try:
            return inner(tokens, positions, length, *a)
        finally:
            in_forward[0] += time.perf_counter() - t

    batch = codec.new_batch(decoder_pool(codec, beams, opts))
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
                run.joined += missing
    finally:
        del stack.forward  # back to the class's method
    return run


def alternate(refs: Sequence[str], rounds: int, measure: Callable[[Path], T]) -> dict[str, list[T]]:
    """`measure(root)` for this tree ("this tree") and each git ref, `rounds` times in turn, so
    that drifts in the machine's load hit every side alike. Each ref is checked out in a
    temporary worktree, removed at the end. Measure in a fresh process (`run_worker`), so that
    each side imports its own code."""
    trees: dict[str, Path] = {"this tree": REPO_ROOT}
    try:
        for ref in refs:
            tmp = Path(tempfile.mkdtemp(prefix=f"bench-{ref}-"))
            git = ["git", "worktree", "add", "--detach", str(tmp), ref]
            subprocess.run(git, cwd=REPO_ROOT, check=True, capture_output=True)
            trees[ref] = tmp
        runs: dict[str, list[T]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, root in trees.items():
                runs[name].append(measure(root))
        return runs
    finally:
        for name, root in trees.items():
            if name != "this tree":
                git = ["git", "worktree", "remove", "--force", str(root)]
                subprocess.run(git, cwd=REPO_ROOT, check=False, capture_output=True)
