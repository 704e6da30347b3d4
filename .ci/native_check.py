"""The fairseq2 reference and the native check that CI compares, through the installed CLI.

    python .ci/native_check.py reference BUNDLE EXPECTED.json   # main venv: fairseq2 backend
    python .ci/native_check.py check BUNDLE EXPECTED.json       # a venv without fairseq2

`reference` starts `sonar-llm serve` with the fairseq2 backend, asks `POST /generate` a few
prompts and writes the answers. `check` runs `sonar-llm generate --json` on each prompt with the
native backend, then asks a native `sonar-llm serve` the same, and fails unless every answer
equals the reference's, sentence for sentence. Neither can pass on nothing: the reference must
hold non-empty sentences for every prompt (and not the same ones for all), and `check` fails in
a venv where fairseq2, fairseq2n or sonar-space can be imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "The cat sat on the mat. It was raining outside.",
    "Prices rose sharply last year. The committee will meet again on Monday. We walked home.",
    "She opened the letter and read it twice.",
]
# Random weights decode to the token cap: a low one keeps each call short.
OPTIONS = {"max_sentences": 2, "max_tokens": 32}
FAIRSEQ2_MODULES = ("fairseq2", "fairseq2n", "sonar")
READY_TIMEOUT_S = 180.0


def cli() -> str:
    """The `sonar-llm` script installed beside this interpreter (the venv under test)."""
    path = Path(sys.executable).with_name("sonar-llm")
    found = str(path) if path.exists() else shutil.which("sonar-llm")
    if found is None:
        raise SystemExit("no sonar-llm script beside this interpreter: is the project installed?")
    return found


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """What is compared: the sentences and why generation stopped."""
    return {"sentences": body["sentences"], "finish_reason": body["finish_reason"]}


def backend_env(backend: str) -> dict[str, str]:
    return dict(os.environ, SONAR_LLM_SONAR_BACKEND=backend)


def generate(bundle: Path, prompt: str, backend: str) -> dict[str, Any]:
    """One `sonar-llm generate --json` process: what a user runs."""
    cmd = [cli(), "generate", prompt, "--model", str(bundle), "--json"]
    for name, value in OPTIONS.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    out = subprocess.run(
        cmd, env=backend_env(backend), capture_output=True, text=True, timeout=300, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return answer(json.loads(out.stdout.strip().splitlines()[-1]))


def check_reference(expected: dict[str, Any]) -> None:
    """Refuse a reference a comparison could pass vacuously against."""
    answers = expected["answers"]
    if expected.get("backend") != "fairseq2" or [a["prompt"] for a in answers] != PROMPTS:
        raise SystemExit("the reference was not made by `reference` with fairseq2 on PROMPTS")
    for a in answers:
        if not a["sentences"] or not all(s.strip() for s in a["sentences"]):
            raise SystemExit(f"the reference has no sentences for {a['prompt']!r}: {a}")
    if len({json.dumps(a["sentences"]) for a in answers}) < 2:
        raise SystemExit("the reference gives every prompt the same sentences")


def reference(bundle: Path, expected: Path) -> None:
    if importlib.util.find_spec("fairseq2") is None:
        raise SystemExit("the reference needs fairseq2 importable in this venv")
    answers = [
        {"prompt": p, **a} for p, a in zip(PROMPTS, over_http(bundle, "fairseq2"), strict=True)
    ]
    data = {"backend": "fairseq2", "bundle": str(bundle), "answers": answers}
    check_reference(data)
    expected.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"reference (fairseq2): {sum(len(a['sentences']) for a in answers)} sentences")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(client: httpx.Client, server: subprocess.Popen[str]) -> None:
    """Poll readiness until 200, the server exits, or the deadline passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"sonar-llm serve exited with {server.returncode}")
        try:
            if client.get("/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"sonar-llm serve not ready after {READY_TIMEOUT_S:.0f} s")


def over_http(bundle: Path, backend: str) -> list[dict[str, Any]]:
    """`sonar-llm serve` on a free loopback port; each prompt through `POST /generate`."""
    port = free_port()
    cmd = [cli(), "serve", "--model", str(bundle), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=backend_env(backend), text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_ready(client, server)
            answers = []
            for p in PROMPTS:
                r = client.post("/generate", json={"prompt": p, **OPTIONS})
                r.raise_for_status()
                answers.append(answer(r.json()))
            return answers
    finally:
        server.terminate()
        server.wait(timeout=60)


def check(bundle: Path, expected_path: Path) -> None:
    present = [m for m in FAIRSEQ2_MODULES if importlib.util.find_spec(m) is not None]
    if present:
        raise SystemExit(f"this venv must not have {present}: the check is for the native path")
    expected = json.loads(expected_path.read_text())
    check_reference(expected)
    want = [answer(a) for a in expected["answers"]]
    got = {
        "sonar-llm generate": [generate(bundle, p, "native") for p in PROMPTS],
        "POST /generate": over_http(bundle, "native"),
    }
    bad = 0
    for how, answers in got.items():
        for p, w, g in zip(PROMPTS, want, answers, strict=True):
            if w != g:
                bad += 1
                print(f"DIFFER ({how}) {p!r}:\n  fairseq2: {w}\n  native:   {g}")
    n = sum(len(w["sentences"]) for w in want)
    if bad:
        raise SystemExit(f"{bad} answers differ from the fairseq2 reference")
    print(f"native = fairseq2: {len(PROMPTS)} prompts ({n} sentences), CLI and HTTP, identical")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["reference", "check"])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("expected", type=Path)
    args = ap.parse_args()
    (reference if args.mode == "reference" else check)(args.bundle, args.expected)


if __name__ == "__main__":
    main()
