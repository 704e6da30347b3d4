"""Memory while loading: is there a full fp32 copy of the weights at any moment?

Loads a bundle (SONAR-LLM + SONAR encoder and decoder) once per dtype, each in its own process,
and samples /proc/self/status every 20 ms during the load. Two kinds of resident memory are told
apart, because they mean different things:

  anonymous (RssAnon): the process's own memory (the weights it keeps, any temporary copies);
      its peak against its value after loading shows whether a second copy was ever made;
  file-backed (RssFile): pages of the memory-mapped checkpoint files, read through the page
      cache; clean, so the kernel can drop them under pressure. VmHWM (what `ps` and most tools
      call peak RSS) counts both.

    .venv/bin/python bench/load_memory.py --bundle DIR [--dtypes float32,bfloat16]

Linux only (reads /proc). Writes bench/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    environment,
    print_header,
    proc_status,
    run_worker,
    write_json,
)

GIB = 2**30


def _worker(bundle: str, dtype: str) -> dict[str, Any]:
    from models.pipeline import SonarLLMPipeline

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = proc_status()
            for key in peak:
                peak[key] = max(peak[key], now[key])
            time.sleep(0.02)

    before = proc_status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    pipe = SonarLLMPipeline.load(bundle, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = proc_status()
    # The three networks' parameters (the SONAR-LLM's unused token head is a meta tensor).
    modules = (pipe.model, *pipe.codec.modules())
    params = {id(p): p for m in modules for p in m.parameters() if not p.is_meta}
    weights = sum(p.numel() * p.element_size() for p in params.values())
    return {
        "dtype": dtype,
        "load_s": seconds,
        "weights_bytes": weights,
        "before": before,
        "after": after,
        "peak_anon": max(peak["RssAnon"], after["RssAnon"]),
        "peak_file": max(peak["RssFile"], after["RssFile"]),
        "vm_hwm": after["VmHWM"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle (e.g. tiny --preset full)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "load_memory.json")
    args = parser.parse_args()
    print_header("resident memory while loading, per dtype (each in a fresh process)")
    runs = []
    for dtype in args.dtypes.split(","):
        run = run_worker(__file__, [args.bundle, dtype])
        runs.append(run)
        base = run["before"]["RssAnon"]
        print(
            f"{dtype:>9}: loaded in {run['load_s']:.1f} s; weights {run['weights_bytes'] / GIB:.2f}"
            f" GiB; anonymous {(run['after']['RssAnon'] - base) / GIB:.2f} GiB after loading, "
            f"peak {(run['peak_anon'] - base) / GIB:.2f} GiB (over the "
            f"{base / GIB:.2f} GiB before); mapped file pages peak "
            f"{run['peak_file'] / GIB:.2f} GiB; VmHWM {run['vm_hwm'] / GIB:.2f} GiB"
        )
    write_json(
        args.out,
        {
            "benchmark": "load_memory",
            "environment": environment(),
            "bundle": args.bundle,
            "runs": runs,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
