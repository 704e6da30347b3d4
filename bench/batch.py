"""`sonar-llm batch` against a live server: the same completions offline and over HTTP.

  server: `sonar-llm serve` in a subprocess on loopback; `--concurrency` closed-loop clients
          POST /v1/completions until all `--requests` are answered (timed once ready).
  batch:  the same requests as an OpenAI batch file through `server.batch.run_batch` (what
          `sonar-llm batch` runs) on an offline `LLM` loaded in this process (timed after its
          load and a one-line warm-up, as the server's clock starts once it is warm).
Both load the same bundle with the default engine limits and get the same bodies (`eos_threshold`
1.0, so each makes exactly `--max-sentences`); the texts must agree. The server runs first and
exits before the batch loads, so only one model is in memory at a time.

    .venv/bin/python bench/batch.py [--bundle DIR] [--requests 64] [--concurrency 16]
        [--max-running 32]

Prints both throughputs and batch/server; exits 1 if a request failed or the answers differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_header

from models import tiny
from server.api.app import model_name
from server.batch import run_batch
from server.engine import LLM
from server.settings import Settings
from server.testing import ServerProcess

WORDS = "the cat dog sun moon river city night music garden train story runs sleeps".split()


def bodies(n: int, max_sentences: int, max_tokens: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choices(WORDS, k=rng.randint(4, 9))).capitalize() + "."
            for _ in range(rng.randint(2, 5))
        ]
        out.append(
            {
                "prompt": " ".join(sentences),
                "max_sentences": max_sentences,
                "max_tokens": max_tokens,
                "eos_threshold": 1.0,
            }
        )
    return out


async def over_http(url: str, work: list[dict[str, Any]], concurrency: int) -> list[Any]:
    answers: list[Any] = [None] * len(work)
    queue = list(enumerate(work))[::-1]
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:

        async def client_loop() -> None:
            while queue:
                i, body = queue.pop()
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                answers[i] = [c["text"] for c in r.json()["choices"]]

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return answers


def server_side(
    bundle: Path, work: list[dict[str, Any]], concurrency: int, running: int, tmp: Path
) -> Any:
    args = ["--model", str(bundle), "--punkt-url", "", "--max-running", str(running)]
    with ServerProcess(args, tmp / "serve.log") as server:
        server.wait_ready(1800)
        t0 = time.perf_counter()
        answers = asyncio.run(over_http(server.url, work, concurrency))
        seconds = time.perf_counter() - t0
        server.stop()
    return answers, seconds


def batch_side(bundle: Path, work: list[dict[str, Any]], running: int, tmp: Path) -> Any:
    # No deadline, as `sonar-llm batch` sets it (on a loaded CPU a line may outlast 300 s).
    settings = Settings(model=str(bundle), punkt_url="", request_timeout=None, max_running=running)
    llm = LLM.from_settings(settings)
    name = model_name(settings)

    def run(lines: list[dict[str, Any]], tag: str) -> tuple[list[Any], float]:
        src, dst = tmp / f"{tag}-in.jsonl", tmp / f"{tag}-out.jsonl"
        rows = [
            {"custom_id": str(i), "url": "/v1/completions", "body": b} for i, b in enumerate(lines)
        ]
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        t0 = time.perf_counter()
        run_batch(llm, settings, name, src, dst)
        seconds = time.perf_counter() - t0
        answers: list[Any] = [None] * len(lines)
        for line in dst.read_text().splitlines():
            row = json.loads(line)
            response = row["response"] or {}
            if response.get("status_code") == 200:
                answers[int(row["custom_id"])] = [c["text"] for c in response["body"]["choices"]]
        return answers, seconds

    run(work[:1], "warm-up")
    return run(work, "batch")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, help="model bundle (default: the tiny one, built)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-sentences", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-running", type=int, default=Settings().max_running, help="both sides")
    args = p.parse_args()
    print_header("sonar-llm batch vs a live server, the same /v1/completions requests")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bundle = args.bundle or tiny.build(tmp / "bundle").root
        work = bodies(args.requests, args.max_sentences, args.max_tokens)
        served, server_s = server_side(bundle, work, args.concurrency, args.max_running, tmp)
        offline, batch_s = batch_side(bundle, work, args.max_running, tmp)
    sentences = args.requests * args.max_sentences
    print(
        f"# {args.requests} requests x {args.max_sentences} sentences, max_running "
        f"{args.max_running}, bundle {bundle}"
    )
    for label, seconds in ((f"server, {args.concurrency} clients", server_s), ("batch", batch_s)):
        rate = sentences / seconds
        print(f"{label:>20}: {seconds:8.2f} s  {rate:7.2f} sentences/s")
    print(f"batch / server throughput: {server_s / batch_s:.2f}x")
    failed = sum(a is None for a in offline) + sum(a is None for a in served)
    differ = [i for i, (a, b) in enumerate(zip(offline, served, strict=True)) if a != b]
    for i in differ[:3]:
        print(f"# request {i}: batch {offline[i]!r}\n#   server {served[i]!r}")
    if failed or differ:
        print(f"FAILED: {failed} requests failed, {len(differ)} answers differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
