"""`bench/gpu.py`, the one-command GPU benchmark, run end to end on the CPU (`--quick`, tiny
bundle) so that it cannot rot while no GPU is at hand; and its FLOP count and peak table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import load_bench

from models.pipeline import SonarLLMPipeline

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_cpu_run_measures_every_phase(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this tree's packages, not an installed copy
    args = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--cache-dir", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(GPU), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["errors"] == {} and data["skipped"] == []
    assert data["environment"]["torch"] and data["device"] == {
        "type": "cpu",
        "name": "cpu",
        "peak_name": None,
        "peak": None,
    }
    conc = [1, 16, 64]
    assert data["settings"]["concurrency"] == conc
    assert set(data["phases"]) == {
        "bundle",
        "load float32",
        "load bfloat16",
        "cpu_match",
        "engine",
        "decoder_step float32",
        "decoder_step bfloat16",
    }
    assert all(s >= 0 for s in data["phases"].values())

    ref = data["engine"]["float32"]["baseline"]
    assert ref["requests"] >= 2 and ref["sentences"] > 0 and ref["sentences_per_s"] > 0
    for dtype in ("float32", "bfloat16"):
        rounds = data["engine"][dtype]["engine"]
        assert data["engine"][dtype]["baseline"] == ref  # one authors' loop for every dtype
        assert [r["concurrency"] for r in rounds] == conc
        for r in rounds:
            assert r["prompts"] >= r["concurrency"] and r["sentences"] > 0
            assert r["sentences_per_s"] > 0
            assert r["speedup"] == pytest.approx(r["sentences_per_s"] / ref["sentences_per_s"])
            assert r["compared"] == ref["requests"]  # every prompt of the reference, each round
            assert 0 <= r["identical_share"] <= 1
    # identical outputs in fp32
    assert all(r["identical"] == r["compared"] > 0 for r in data["engine"]["float32"]["engine"])

    for dtype in ("float32", "bfloat16"):
        step = data["decoder_step"][dtype]
        assert [r["beams"] for r in step["runs"]] == [1, 16, 64]
        shapes = step["shapes"]
        least = 2 * (shapes["layer_weights"] + shapes["vocab"] * shapes["model_dim"])
        for r in step["runs"]:
            assert r["beams"] <= r["mean_rows"] <= 5 * r["beams"]
            assert r["ms_per_step"] > 0 and r["ms_per_step_median"] > 0
            assert r["flops_per_step"] >= least * r["mean_rows"]
            assert r["achieved_tflops"] == pytest.approx(
                r["flops_per_step"] / (r["ms_per_step"] / 1e3) / 1e12
            )
            assert "peak_tflops" not in r  # no peak for a CPU
        rows = [r["mean_rows"] for r in step["runs"]]
        assert rows == sorted(rows)
        assert sum(r["finished"] for r in step["runs"]) > 0  # beams came and went

    # The device against the CPU: on a CPU run both sides are the CPU, so no verdict.
    match = data["cpu_match"]
    assert match["same_device"] and match["rows"] == data["settings"]["cpu_rows"]
    assert match["identical_rows"] == match["rows"] and match["encoder_max_abs_diff"] == 0.0
    assert match["min_tokens"] < match["max_tokens"]

    cpu, engine32, engine16, roofline = data["goals"]
    assert "CPU" in cpu["goal"] and cpu["value"] == 1.0 and cpu["passed"] is None
    assert "fp32 engine" in engine32["goal"] and engine32["passed"] is True
    assert "50x" in engine16["goal"]
    assert engine16["value"] == data["engine"]["bfloat16"]["engine"][-1]["speedup"]
    assert engine16["passed"] is None and "GPU" in engine16["note"]  # reported, not judged
    assert "roofline" in roofline["goal"] and roofline["passed"] is None  # no peak on a CPU

    out = proc.stdout
    assert "# summary" in out and "## decoder_step bfloat16" in out
    assert "PASS  fp32 engine outputs identical to the authors' loop" in out


def test_peaks_are_found_by_device_name() -> None:
    decoder_step = load_bench("decoder_step")
    assert decoder_step.device_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert decoder_step.device_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert decoder_step.device_peak("NVIDIA H200").name == "H200 SXM"
    assert decoder_step.device_peak("NVIDIA A100-SXM4-80GB").name == "A100 SXM 80GB"
    assert decoder_step.device_peak("NVIDIA A100-PCIE-40GB").name == "A100 PCIe 40GB"
    assert decoder_step.device_peak("NVIDIA L40S").name == "L40S"
    assert decoder_step.device_peak("NVIDIA L4").name == "L4"
    assert decoder_step.device_peak("Tesla T4") is None
    assert decoder_step.device_peak(None) is None


def test_step_flops_count_the_decoder_shapes(pipe: SonarLLMPipeline) -> None:
    decoder_step = load_bench("decoder_step")
    stack = pipe.codec.decoder_stack
    assert stack is not None
    shapes = decoder_step.StepShapes.of(stack)
    # The tiny preset's SONAR decoder: 64-d, 2 layers, FFN 128 (models.tiny).
    d, layers, ffn, vocab = 64, 2, 128, stack.vocab_size
    per_layer = 2 * (4 * d * d + 2 * d * ffn)
    length = 7
    want = layers * (per_layer + 4 * length * d) + 2 * vocab * d
    assert shapes.flops(3, length) == 3 * want
    weights = (layers * (4 * d * d + 2 * d * ffn) + vocab * d) * 4
    assert (
        shapes.bytes(3, length) == weights + 3 * length * stack.bytes_per_position() + 3 * vocab * 4
    )


def test_speed_goals_are_judged_on_a_gpu_at_full_size_only() -> None:
    gpu = load_bench("gpu")
    peak = gpu.device_peak("NVIDIA H100 80GB HBM3")

    def judged(device: str, preset: str, speedup: float, over: float) -> list[bool | None]:
        data = {
            "device": {"type": device},
            "settings": {"preset": preset},
            "engine": {
                "bfloat16": {
                    "engine": [
                        {"concurrency": 16, "speedup": 99.0},
                        {"concurrency": 64, "speedup": speedup},
                    ]
                }
            },
            "decoder_step": {
                "bfloat16": {
                    "runs": [
                        {"beams": 1, "over_roofline": 1.0},
                        {"beams": 64, "over_roofline": over},
                    ]
                }
            },
        }
        goals = gpu.goals(data, peak)
        assert [g["value"] for g in goals[2:]] == [speedup, over]
        return [g["passed"] for g in goals[2:]]

    assert judged("cuda", "full", 50.0, 3.0) == [True, True]
    assert judged("cuda", "full", 49.9, 3.1) == [False, False]  # at C=64, the largest batch
    assert judged("cuda", "tiny", 80.0, 1.0) == [None, None]
    assert judged("cpu", "full", 80.0, 1.0) == [None, None]


def test_device_script_carries_the_lock_versions_of_what_the_gpu_image_lacks() -> None:
    """`bench/device.sh`'s header names the wheels to carry: each at the version uv.lock has,
    and every package the serving path imports that the GPU image lacks is among them."""
    header = (ROOT / "bench" / "device.sh").read_text().split("\nset -euo pipefail")[0]
    download = header[header.index("pip download") :]
    carried = dict(re.findall(r"([a-z0-9-]+)==([\w.]+)", download))
    locked = {
        p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
    }
    assert carried == {name: locked[name] for name in carried}
    lacking = {"fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "uvicorn"}
    assert lacking | {"sse-starlette", "nltk", "sentencepiece"} <= set(carried)
