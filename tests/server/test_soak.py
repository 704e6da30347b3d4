"""The soak test, short mode: `bench/soak.py --short` against the real server (~1 minute).

The slowest test of the suite, on purpose: `sonar-llm serve` starts as a subprocess (torch and
fairseq2 imports, model load, warm-up) and takes ~25 s of concurrent streaming and JSON
clients, client disconnects, bad requests and 503 bursts; then every check of the soak must
hold (see bench/soak.py's docstring for what they are and how disconnects are counted).
Deselect it with `-m "not slow"` for a quick run; CI runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_bench

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_soak_short(bundle_dir: Path, tmp_path: Path) -> None:
    soak = load_bench("soak")
    result = soak.main(["--short", "--model", str(bundle_dir), "--out", str(tmp_path)])

    failed = [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["passed"]]
    assert not failed, "\n".join(
        ["soak checks failed:", *failed, "first problems:", *result["problems"][:15]]
    )
    assert result["passed"]

    # The report is written, and the load really exercised what the checks are about.
    saved = json.loads((tmp_path / "soak-short.json").read_text())
    assert saved["passed"] and saved["checks"] == result["checks"]
    assert (tmp_path / "soak-short.png").stat().st_size > 10_000
    cancel = result["cancellation"]
    assert cancel["disconnects_before_final"] > 0 and cancel["early_disconnects"] > 0
    assert cancel["server_cancelled"] > 0
    assert result["outcomes"].get("rejected_503", 0) > 0
    bad_kinds = {k.removeprefix("bad:") for k in result["by_kind"] if k.startswith("bad:")}
    assert bad_kinds == set(soak.Soak.BAD_KINDS)  # taken in turn: all of them
    streamed = sum(v.get("completed", 0) for k, v in result["by_kind"].items() if "_stream" in k)
    assert streamed > 0 and result["outcomes"].get("completed", 0) > 20
    mem = result["memory"]
    assert mem["growth_after_warm_mb"] < mem["bound_mb"]
