"""`sonar-llm batch`: OpenAI batch files through the real CLI, answered as the server answers.

The input mixes completions (several prompts, n > 1, seeded sampling), chat, embeddings and
lines that are no request or that the server refuses; each output body is compared with what
the app answers for the same body.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from api_helpers import ready_client, settings, wait_until
from fastapi.testclient import TestClient
from helpers import PROMPTS

from models import tiny
from models.pipeline import SonarLLMPipeline
from server.api.app import create_app

LINES = 200
SHORT = {"max_tokens": 16, "max_sentences": 2}


def bodies(model: str) -> list[tuple[str, Any]]:
    """(url, body) of every kind: valid ones, and ones the server refuses with 400/404."""
    chat = "/v1/chat/completions"
    out: list[tuple[str, Any]] = []
    for i, p in enumerate(PROMPTS):
        out.append(("/v1/completions", {"prompt": p, **SHORT, "max_sentences": 1 + i % 3}))
        out.append((chat, {"messages": [{"role": "user", "content": p}], **SHORT}))
    out += [
        ("/v1/completions", {"prompt": PROMPTS[:3], "n": 2, **SHORT, "model": model}),
        ("/v1/completions", {"prompt": PROMPTS[1], "temperature": 0.8, "seed": 3, "n": 2, **SHORT}),
        ("/v1/completions", {"prompt": PROMPTS[2], "eos_threshold": -1.0, **SHORT}),
        ("/v1/embeddings", {"input": PROMPTS[:4]}),
        ("/v1/embeddings", {"input": "One sentence.", "encoding_format": "base64"}),
        ("/v1/completions", {"prompt": "Hi.", "max_tokens": "many"}),  # 400: schema
        ("/v1/completions", {"prompt": "   "}),  # 400: empty prompt
        ("/v1/completions", {"prompt": "Hi.", "source_lang": "xxx_Latn"}),  # 400: engine
        (chat, {"messages": []}),  # 400
        ("/v1/completions", {"prompt": "Hi.", "model": "gpt-4"}),  # 404
        ("/v1/embeddings", {"input": "Hi.", "dimensions": 3}),  # 400
        ("/v1/completions", None),  # 400: no body
    ]
    return out


def write_input(path: Path, model: str) -> dict[str, tuple[str, Any]]:
    """LINES lines cycling through `bodies`, every 9th line no request at all; returns the
    request lines by custom_id."""
    kinds = bodies(model)
    broken = [
        "not json at all",
        json.dumps({"url": "/v1/completions", "body": {"prompt": "Hi."}}),  # no custom_id
        json.dumps({"custom_id": "line-1", "url": "/v1/completions", "body": {"prompt": "x"}}),
        json.dumps({"custom_id": "bad-url-{n}", "url": "/v1/edits", "body": {}}),
        json.dumps({"custom_id": "bad-method-{n}", "method": "GET", "url": "/v1/embeddings"}),
    ]
    requests: dict[str, tuple[str, Any]] = {}
    lines = []
    for n in range(1, LINES + 1):
        if n % 9 == 0:
            lines.append(broken[(n // 9) % len(broken)].replace("{n}", str(n)))
            continue
        url, body = kinds[n % len(kinds)]
        row: dict[str, Any] = {"custom_id": f"line-{n}", "method": "POST", "url": url}
        if body is not None:
            row["body"] = body
        requests[f"line-{n}"] = (url, body)
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return requests


def batch(src: Path, dst: Path, bundle: Path, *flags: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "server.cli", "batch", str(src), str(dst)]
    return subprocess.Popen(
        [*cmd, "--model", str(bundle), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def finish(proc: subprocess.Popen[str]) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stable(status: int, body: dict[str, Any]) -> Any:
    """What must not differ between two answers to one body (ids and timestamps may)."""
    if status != 200:
        return status, body
    if body.get("object") == "list":  # embeddings
        return vectors(body), body["usage"]
    choices = [
        (c["text"] if "text" in c else c["message"]["content"], c["finish_reason"])
        for c in body["choices"]
    ]
    return choices, body["usage"], body["model"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, bundle: tiny.Bundle) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("batch")
    src, dst = root / "in.jsonl", root / "out.jsonl"
    requests = write_input(src, bundle.root.name)
    finish(batch(src, dst, bundle.root))
    return src, (requests, read(dst))


def test_every_line_gets_the_servers_answer(
    run: tuple[Path, Any], bundle: tiny.Bundle, pipe: SonarLLMPipeline
) -> None:
    _, (requests, rows) = run
    assert len(rows) == LINES
    assert sorted(int(r["id"].removeprefix("batch_req_")) for r in rows) == list(
        range(1, LINES + 1)
    )
    by_id = {r["custom_id"]: r for r in rows if r["response"] is not None}
    assert set(by_id) == set(requests)
    app = create_app(settings(model=str(bundle.root)), pipe=pipe)
    answers: dict[str, Any] = {}
    with ready_client(app) as client:
        for custom_id, (url, body) in requests.items():
            key = json.dumps([url, body])
            if key not in answers:
                answers[key] = server_answer(client, url, body)
            response = by_id[custom_id]["response"]
            assert stable(response["status_code"], response["body"]) == answers[key], custom_id
            assert by_id[custom_id]["error"] is None
    statuses = Counter(r["response"]["status_code"] for r in by_id.values())
    assert statuses[200] > 100 and statuses[400] > 10 and statuses[404] > 0
    # Lines that are no request: an error each, custom_id null where it has none of its own.
    broken = [r for r in rows if r["response"] is None]
    assert len(broken) == LINES // 9
    codes = Counter(r["error"]["code"] for r in broken)
    assert set(codes) == {
        "invalid_json",
        "missing_custom_id",
        "duplicate_custom_id",
        "invalid_url",
        "invalid_method",
    }
    own = {"invalid_url", "invalid_method"}  # the lines that have a custom_id of their own
    assert all((r["custom_id"] is None) != (r["error"]["code"] in own) for r in broken)


class Vectors:
    """Embeddings, equal when within float32 rounding: the encoder's batch (which sentences
    are encoded together, which come from its cache) moves the last bits, for the server's
    own answers under load as well."""

    def __init__(self, rows: list[list[float]]) -> None:
        self.rows = torch.tensor(rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vectors) and torch.allclose(
            self.rows, other.rows, rtol=0, atol=1e-6
        )

    def __repr__(self) -> str:
        return f"Vectors({self.rows.shape})"


def vectors(body: dict[str, Any]) -> Vectors:
    rows = [d["embedding"] for d in body["data"]]
    if rows and isinstance(rows[0], str):  # base64 little-endian float32
        rows = [np.frombuffer(base64.b64decode(r), dtype="<f4").tolist() for r in rows]
    return Vectors(rows)


def server_answer(client: TestClient, url: str, body: Any) -> Any:
    r = client.post(url, json=body) if body is not None else client.post(url)
    return stable(r.status_code, r.json())


def head(src: Path, dst: Path, n: int = 60) -> Path:
    """The first n lines of `src` (their line numbers, and so their output ids, are kept)."""
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(True)[:n]))
    return dst


def test_killed_and_rerun_it_completes_without_duplicates(
    run: tuple[Path, Any], bundle: tiny.Bundle, tmp_path: Path
) -> None:
    src, (_, full) = run
    src, dst = head(src, tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    # One request at a time: the kill lands with most lines still to come.
    proc = batch(src, dst, bundle.root, "--max-running", "1")
    try:
        wait_until(lambda: dst.exists() and dst.read_text().count("\n") >= 12, 300, "12 lines")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    first = read(dst)
    assert 12 <= len(first) < 60
    with dst.open("a") as f:  # as a kill in the middle of a write leaves it
        f.write('{"id": "batch_req_')
    finish(batch(src, dst, bundle.root))
    rows = read(dst)
    assert rows[: len(first)] == first
    assert len(rows) == 60
    assert len({r["id"] for r in rows}) == 60
    ids = [r["custom_id"] for r in rows if r["custom_id"] is not None]
    assert len(ids) == len(set(ids))
    want = {r["id"]: r for r in full}
    for r in rows:
        w = want[r["id"]]
        assert r["custom_id"] == w["custom_id"] and r["error"] == w["error"]
        if r["response"] is not None:
            got = stable(r["response"]["status_code"], r["response"]["body"])
            assert got == stable(w["response"]["status_code"], w["response"]["body"])


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(
    run: tuple[Path, Any], bundle: tiny.Bundle, tmp_path: Path
) -> None:
    src, dst = head(run[0], tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    proc = batch(src, dst, bundle.root, "--max-running", "1")
    wait_until(lambda: dst.exists() and dst.read_text().count("\n") >= 12, 300, "12 lines")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err
    assert dst.read_text().endswith("\n")
    finish(batch(src, dst, bundle.root))
    assert sorted(r["id"] for r in read(dst)) == sorted(f"batch_req_{n}" for n in range(1, 61))
