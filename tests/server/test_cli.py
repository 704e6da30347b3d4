"""`sonar-llm` as a user runs it: generate, tiny, convert, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import tiny
from models.checkpoint import load_sonar_llm
from server.cli import main

FAST = ["--max-tokens", "40"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_sentences_then_json(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path
) -> None:
    code, out, err = run_cli(
        capsys, "generate", "Hello there. The cat runs.", "--model", str(bundle_dir),
        "--max-sentences", "3", "--json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["finish_reason"] == "length"
    assert len(result["sentences"]) == 3
    assert result["usage"]["prompt_sentences"] == 2
    assert result["usage"]["generated_sentences"] == 3

    code, out, _ = run_cli(
        capsys, "generate", "Hello there. The cat runs.", "--model", str(bundle_dir),
        "--max-sentences", "3", *FAST,
    )  # fmt: skip
    assert out.splitlines() == result["sentences"]


def test_summarize_uses_one_sentence_by_default(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path
) -> None:
    code, out, _ = run_cli(
        capsys, "generate", "The cat runs. The dog sleeps. The sun sets.", "--summarize",
        "--model", str(bundle_dir), "--json", *FAST,
    )  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert len(result["sentences"]) == 1
    assert result["usage"]["prompt_sentences"] == 4  # 3 document sentences + the instruction


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "   "], "prompt"),
        (["generate", "Hi.", "--source-lang", "klingon"], "source_lang"),
        (["generate", "Hi.", "--max-sentences", "0"], "max_sentences"),
        (["generate", "Hi.", "--eos-threshold", "1.5"], "eos_threshold"),
        (["generate", "Hi.", "--beam-size", "0"], "beam_size"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path, args: list[str], needle: str
) -> None:
    code, _, err = run_cli(capsys, *args, "--model", str(bundle_dir))
    assert code == 2
    errors = [line for line in err.splitlines() if not line.startswith("loading: ")]
    assert len(errors) == 1 and errors[0].startswith("sonar-llm: error:")
    assert needle in errors[0]
    assert "Traceback" not in err


def test_not_a_checkpoint_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for model in (str(tmp_path / "notes.txt"), str(tmp_path / "missing-dir")):
        code, _, err = run_cli(capsys, "generate", "Hi.", "--model", model)
        assert code == 2
        errors = [line for line in err.splitlines() if not line.startswith("loading: ")]
        assert len(errors) == 1 and model in errors[0] and "Traceback" not in err


def test_config_not_matching_weights_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    src = bundle_dir / "sonar-llm"
    (model_dir / "pytorch_model.bin").symlink_to(src / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    config["llama_config"]["hidden_size"] = 96
    (model_dir / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "convert", str(model_dir), str(tmp_path / "out"))
    assert code == 2
    assert "hidden" in err or "shape" in err or "[" in err
    assert len(err.strip().splitlines()) == 1


def test_tiny_and_convert(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "tiny", str(tmp_path / "b"))
    assert code == 0 and tiny.is_bundle(tmp_path / "b")
    assert "random weights" in out
    code, _, err = run_cli(
        capsys, "convert", str(tmp_path / "b" / "sonar-llm"), str(tmp_path / "c")
    )
    assert code == 0, err
    assert (tmp_path / "c" / "model.safetensors").is_file()
    original, _ = load_sonar_llm(tmp_path / "b" / "sonar-llm")
    converted, report = load_sonar_llm(tmp_path / "c")
    assert report.format == "hf-dir"
    for (name, a), (_, b) in zip(
        original.state_dict().items(), converted.state_dict().items(), strict=True
    ):
        assert a.equal(b), name


def test_installed_entry_point_runs_on_the_demo_bundle(tmp_path: Path) -> None:
    """The README's main command path: no model configured → demo bundle, with a warning."""
    exe = Path(sys.executable).parent / "sonar-llm"
    env = {**os.environ, "SONAR_LLM_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [str(exe), "generate", "Hello there.", "--max-sentences", "2", "--json", *FAST],
        capture_output=True, text=True, env=env, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "gibberish" in proc.stderr
    assert proc.stderr.count("gibberish") == 1
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["sentences"]) == 2
    assert tiny.is_bundle(tmp_path / "demo-bundle")


ROOT = Path(__file__).resolve().parents[2]


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if not line.startswith("loading: ")]
    assert len(errors) == 1, err
    assert errors[0].startswith("sonar-llm: error: ") and "Traceback" not in err
    return errors[0]


def test_progress_names_each_phase_with_sizes_and_times(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path
) -> None:
    code, _, err = run_cli(
        capsys, "generate", "Hello there.", "--model", str(bundle_dir), "--max-sentences", "1",
        *FAST,
    )  # fmt: skip
    assert code == 0, err
    lines = [line.removeprefix("loading: ") for line in err.splitlines()]
    size = r"\(\d+(\.\d)? (B|kB|MB|GB)\)"
    took = r"in \d+\.\d s"
    for pattern in (
        rf"reading pytorch_model\.bin {size} \.\.\.",
        rf"\.\.\. pytorch_model\.bin read {took}",
        rf"loaded SONAR-LLM: \d+ tensors {took}",
        rf"SONAR encoder sonar_llm_tiny_encoder {size} \.\.\.",
        rf"\.\.\. SONAR encoder done {took}",
        rf"SONAR decoder sonar_llm_tiny_decoder {size} \.\.\.",
        rf"\.\.\. SONAR decoder done {took}",
        rf"SONAR tokenizer sonar_llm_tiny_encoder {size} \.\.\.",
        rf"\.\.\. SONAR tokenizer done {took}",
    ):
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)


def test_unknown_card_and_missing_file_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path, tmp_path: Path
) -> None:
    model = str(bundle_dir / "sonar-llm")
    code, _, err = run_cli(capsys, "generate", "Hi.", "--model", model, "--encoder", "no_such_card")
    assert code == 2
    line = _one_error_line(err)
    assert "SONAR encoder 'no_such_card'" in line and "--asset-dir" in line

    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "cards.yaml").write_text(
        "name: enc_missing_file\nbase: text_sonar_basic_encoder\ncheckpoint: nothere.pt\n"
    )
    code, _, err = run_cli(
        capsys, "generate", "Hi.", "--model", model, "--encoder", "enc_missing_file",
        "--asset-dir", str(cards),
    )  # fmt: skip
    assert code == 2
    line = _one_error_line(err)
    assert str(cards / "nothere.pt") in line and "enc_missing_file" in line


def test_failed_download_of_the_default_sonar_is_one_line_exit_2(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """The released cards with an empty cache and no way out: fairseq2 really tries to download
    (through a proxy nobody listens on, so it fails at once also on a machine with network)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SONAR_LLM_", "FAIRSEQ2_"))}
    cache = tmp_path / "fairseq2-cache"
    env.update(
        FAIRSEQ2_CACHE_DIR=str(cache),
        HF_HUB_OFFLINE="1",
        SONAR_LLM_PUNKT_URL="",  # this test is about SONAR's files, not nltk's
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        no_proxy="",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "Hi.",
         "--model", str(bundle_dir / "sonar-llm"), "--encoder", "text_sonar_basic_encoder"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    for needle in (
        "text_sonar_basic_encoder",
        "https://dl.fbaipublicfiles.com/SONAR/sonar_text_encoder.pt",
        "$FAIRSEQ2_CACHE_DIR",
        str(cache),
        "--asset-dir",
    ):
        assert needle in line, (needle, line)
    # Progress said what it was about to fetch, and from where, before failing.
    assert "to download from https://dl.fbaipublicfiles.com/SONAR/sonar_text_encoder.pt" in (
        proc.stderr
    )


def test_server_bring_up_failure_says_the_same_line(
    capsys: pytest.CaptureFixture[str], bundle_dir: Path
) -> None:
    from api_helpers import settings, wait_until
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    model = str(bundle_dir / "sonar-llm")
    code, _, err = run_cli(capsys, "generate", "Hi.", "--model", model, "--encoder", "no_such_card")
    assert code == 2
    line = _one_error_line(err).removeprefix("sonar-llm: error: ")

    app = create_app(settings(model=model, encoder="no_such_card", device="cpu"))
    state = app.state.sonar
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until(lambda: state.status == "failed", 120, "bring-up to fail")
        r = client.get("/health/ready")
    assert r.status_code == 503
    assert r.json()["detail"] == line == state.detail
