"""bf16 against fp32 on the CPU, whole pipeline: load memory, speed, and identical sentences.

Each dtype runs in its own process (so peak RSS is its own): it loads the bundle
(`SonarLLMPipeline.load(..., dtype=...)`), records peak and steady resident memory after the
load, then generates one sentence for each of a fixed set of prompts (SONAR encoder, SONAR-LLM,
SONAR decoder beam 5, re-encoding and the EOS test: the offline `server.engine.LLM`). Reported: the
share of sentences identical to fp32, the time per prompt of each, and the ratio.

    .venv/bin/python bench/bf16.py --bundle /work/full-bundle [--prompts 8] [--max-tokens 24]

Writes bench/results/bf16.json.
"""

from __future__ import annotations

import argparse
import json
import sys
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

PROMPTS = [
    "The cat sat on the mat. It was warm.",
    "We walked to the station in the rain.",
    "Prices rose sharply last year. Many families cut back.",
    "The committee will meet again on Monday.",
    "She opened the letter and read it twice.",
    "Rivers carry sand from the mountains to the sea.",
    "The new bridge took four years to build.",
    "He forgot his keys at the office again.",
    "Scientists measured the temperature every hour.",
    "The concert ended late and the streets were empty.",
    "Our team won the match in the final minute.",
    "The library closes early on Fridays.",
]


def _worker(bundle: str, dtype: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    from models.generate import GenerationOptions
    from models.pipeline import SonarLLMPipeline
    from models.sonar_codec import DecodeOptions
    from server.engine import LLM

    t0 = time.perf_counter()
    pipe = SonarLLMPipeline.load(bundle, device="cpu", dtype=dtype)
    load_s = time.perf_counter() - t0
    status = proc_status()
    peak, steady = status["VmHWM"] // 1024, status["VmRSS"] // 1024  # kB
    opts = GenerationOptions(
        max_sentences=1, eos_threshold=1.0, decode=DecodeOptions(max_tokens=max_tokens)
    )
    llm = LLM(pipe)
    texts: list[str] = []
    times: list[float] = []
    for p in PROMPTS[:prompts]:
        t = time.perf_counter()
        finished = llm.generate([p], opts)[0]
        times.append(time.perf_counter() - t)
        texts.append(finished.sentences[0] if finished.sentences else "")
    return {
        "dtype": dtype,
        "load_s": load_s,
        "peak_rss_gb": peak / 2**20,
        "steady_rss_gb": steady / 2**20,
        "seconds": times,
        "texts": texts,
    }


def _run(bundle: str, dtype: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    return run_worker(__file__, [bundle, dtype, prompts, max_tokens])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, help="a bundle directory (tiny --preset full)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    print_header("bf16 vs fp32, whole pipeline on the CPU, one sentence per prompt")
    runs = {
        dt: _run(args.bundle, dt, args.prompts, args.max_tokens) for dt in ("float32", "bfloat16")
    }
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    same = sum(a == b for a, b in zip(fp32["texts"], bf16["texts"], strict=True))
    t32, t16 = sum(fp32["seconds"]), sum(bf16["seconds"])
    for r in (fp32, bf16):
        per_prompt = sum(r["seconds"]) / len(r["seconds"])
        print(
            f"  {r['dtype']:8s}: load {r['load_s']:.1f} s, RSS peak {r['peak_rss_gb']:.2f} GB / "
            f"after load {r['steady_rss_gb']:.2f} GB, {per_prompt:.2f} s per prompt"
        )
    print(
        f"  identical sentences: {same}/{len(fp32['texts'])}; bf16 is {t32 / t16:.2f}× faster",
        flush=True,
    )
    write_json(
        RESULTS_DIR / "bf16.json",
        {
            "environment": environment(),
            "bundle": args.bundle,
            "max_tokens": args.max_tokens,
            "identical": same,
            "prompts": len(fp32["texts"]),
            "speedup": t32 / t16,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
