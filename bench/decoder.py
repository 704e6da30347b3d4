"""The SONAR decoder alone: our batched beam search vs fairseq2's generator, the same embeddings.

Per model (the tiny and small bundles of `bench/engine.py`) and batch size B, both decode the
same B embeddings (the SONAR-LLM's first predictions for B prompts) with beam 5 in one call:
fairseq2's `BeamSearchSeq2SeqGenerator` (what the authors' loop uses) and
`models.beam_search.decode_all` (what the engine's token-level batch runs on). Rounds alternate
the two; the table shows medians and the ratio, and checks the texts are identical.

    .venv/bin/python bench/decoder.py [--models tiny,small] [--batches 1,4,16,64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    environment,
    in_worker_thread,
    median,
    print_header,
    sync,
    write_json,
)
from engine import bundle_for, make_prompts

from models.generate import prompt_sentences
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions


def predictions(pipe: SonarLLMPipeline, n: int) -> torch.Tensor:
    """The model's first predicted embedding for each of n prompts: what the decoder gets."""
    contexts = [
        pipe.encode_prompt(prompt_sentences(p, "eng_Latn", False), "eng_Latn", False)
        for p in make_prompts(n)
    ]
    cache = pipe.model.private_cache([len(c) for c in contexts])
    for i in range(len(contexts)):
        cache.add(i)
    hidden = pipe.model.extend(cache, list(range(len(contexts))), contexts)
    return pipe.model.project(hidden)


def bench_model(
    name: str, bundle: Path, device: str, dtype: str, batches: list[int], rounds: int, opts: Any
) -> dict[str, Any]:
    # fairseq2's generator is the other side: the fairseq2 backend has both.
    pipe = SonarLLMPipeline.load(str(bundle), device=device, dtype=dtype, sonar_backend="fairseq2")
    codec = pipe.codec
    dev = torch.device(device)
    embs = predictions(pipe, max(batches))
    print(
        f"\n## {name} ({device} {dtype}): SONAR {codec.embed_dim}-d, beam {opts.beam_size}, "
        f"max_tokens {opts.max_tokens}"
    )
    print(f"{'batch':>6} {'fairseq2 s':>11} {'ours s':>9} {'speed-up':>9} {'tokens':>7}  outputs")
    rows = []
    for b in batches:
        x = embs[:b]
        times: dict[str, list[float]] = {"fairseq2": [], "ours": []}
        outs: dict[str, Any] = {}
        for r in range(rounds):
            order = ("fairseq2", "ours") if r % 2 == 0 else ("ours", "fairseq2")
            for side in order:

                def run(side: str = side, x: torch.Tensor = x) -> tuple[float, Any]:
                    sync(dev)
                    t0 = time.perf_counter()
                    out = codec.decode(x, "eng_Latn", opts, use_fairseq2=side == "fairseq2")
                    sync(dev)
                    return time.perf_counter() - t0, out

                t, out = in_worker_thread(run)
                times[side].append(t)
                outs[side] = out
        same = [(d.text, d.num_tokens) for d in outs["ours"]] == [
            (d.text, d.num_tokens) for d in outs["fairseq2"]
        ]
        f2, ours = median(times["fairseq2"]), median(times["ours"])
        assert f2 is not None and ours is not None
        tokens = sum(d.num_tokens for d in outs["ours"])
        print(
            f"{b:>6} {f2:>11.3f} {ours:>9.3f} {f2 / ours:>8.1f}x {tokens:>7}  "
            f"{'MATCH' if same else 'DIFFER'}"
        )
        rows.append(
            dict(
                batch=b,
                fairseq2_s=f2,
                ours_s=ours,
                speedup=f2 / ours,
                tokens=tokens,
                identical=same,
                times=times,
            )
        )
    return dict(model=name, device=device, dtype=dtype, rows=rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--bundle-dir", type=Path, default=Path(tempfile.gettempdir()) / "sonar-llm-bench"
    )
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "decoder.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    opts = DecodeOptions(beam_size=args.beam, max_tokens=args.max_tokens)
    print_header("SONAR decoder: our batched beam search vs fairseq2's generator")
    passes = [("cpu", "float32")]
    if torch.cuda.is_available():
        passes += [("cuda", "float32"), ("cuda", "bfloat16")]
    results = []
    ok = True
    for device, dtype in passes:
        for name in args.models.split(","):
            res = bench_model(
                name, bundle_for(name, args.bundle_dir), device, dtype, batches, args.rounds, opts
            )
            # bf16 rounding may legitimately tip a beam: only fp32 must match exactly.
            ok &= dtype != "float32" or all(r["identical"] for r in res["rows"])
            results.append(res)
    write_json(args.out, dict(environment=environment(), results=results))
    print(f"\n{'PASS' if ok else 'FAIL'}: fp32 outputs identical to fairseq2's; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
