"""Filling a host for offline use: punkt_tab at server start, and `sonar-llm download`.

Everything is fetched for real over HTTP from servers on 127.0.0.1 (`file_server`): the SONAR
files of asset cards whose URIs are http URLs (fairseq2's download manager), and punkt_tab from
an nltk data index (nltk's downloader). After the download the servers are shut and a model is
loaded from the caches alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nltk
import pytest
import yaml
from api_helpers import ready_client, settings
from file_server import NLTK_INDEX_URL, FileServer, nltk_data_tree, proxy_env, punkt_on_nltk_path
from helpers import install_fake_punkt_tab

from models import sentences, tiny
from server.api.app import create_app

ROOT = Path(__file__).resolve().parents[2]
TEXT = "Dr. Smith arrived at 5 p.m. on Monday. He met Mr. Jones there. He left."


def _segment(client: Any) -> dict[str, Any]:
    r = client.post("/segment", json={"text": TEXT, "lang": "eng_Latn"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_server_start_fetches_punkt_tab_once(
    bundle_dir: Path, nltk_server: tuple[FileServer, bool]
) -> None:
    server, _ = nltk_server
    expected: list[str] = []
    for start in (1, 2):
        if start == 2:  # a fresh process: nltk's own path, no splitter made
            nltk.data.path[:] = []
            sentences._splitter.cache_clear()
        app = create_app(
            settings(model=str(bundle_dir), device="cpu", warmup=False, punkt_url=NLTK_INDEX_URL)
        )
        with ready_client(app) as client:
            if start == 1:  # nltk's own sent_tokenize, now that punkt_tab is there
                expected = [s.strip() for s in nltk.tokenize.sent_tokenize(TEXT)]
            assert client.get("/info").json()["splitter"] == "punkt_tab"
            for _ in range(3):
                body = _segment(client)
                assert body["splitter"] == "punkt_tab"
                assert body["sentences"] == expected
        # Fetched at the first start, never per request, never again.
        assert server.requests == ["/index.xml", "/packages/tokenizers/punkt_tab.zip"]


def test_server_start_offline_splits_with_the_fallback(
    bundle_dir: Path, no_punkt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    down = FileServer(tmp_path, fail=True)  # every answer a 503
    for name, value in proxy_env(down.url).items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO, logger="sonar_llm.punkt")
    try:
        app = create_app(
            settings(model=str(bundle_dir), device="cpu", warmup=False, punkt_url=NLTK_INDEX_URL)
        )
        with ready_client(app) as client:
            assert client.get("/info").json()["splitter"] == "fallback"
            for _ in range(3):
                assert _segment(client)["splitter"] == "fallback"
    finally:
        down.close()
    assert down.requests == ["/index.xml"]  # one try, at start
    warnings = [r for r in caplog.records if r.name == "sonar_llm.punkt"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert NLTK_INDEX_URL in warnings[0].getMessage()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SONAR_LLM_", "FAIRSEQ2_"))}
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        env.pop(name, None)
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _http_cards(bundle: tiny.Bundle, folder: Path, base_url: str) -> tuple[str, str]:
    """The bundle's SONAR cards under new names, their files at `base_url` (http)."""
    cards = list(yaml.safe_load_all((bundle.asset_dir / "cards.yaml").read_text()))
    names = {bundle.encoder: "dl_http_encoder", bundle.decoder: "dl_http_decoder"}
    for card in cards:
        card["name"] = names[card["name"]]
        card["checkpoint"] = f"{base_url}/{card['checkpoint']}"
        card["tokenizer"] = f"{base_url}/{card['tokenizer']}"
    folder.mkdir()
    (folder / "cards.yaml").write_text(yaml.safe_dump_all(cards, sort_keys=False))
    return names[bundle.encoder], names[bundle.decoder]


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("sonar-llm: error: ")]


def test_download_fills_fresh_caches_then_loads_offline(
    bundle: tiny.Bundle, tmp_path: Path
) -> None:
    sonar = FileServer(bundle.asset_dir)
    _, real = nltk_data_tree(tmp_path / "nltk-server")
    nltk_data = FileServer(tmp_path / "nltk-server")
    encoder, decoder = _http_cards(bundle, tmp_path / "cards", sonar.url)
    fairseq2_cache, cache = tmp_path / "fairseq2", tmp_path / "sonar-llm"
    env = _env(
        FAIRSEQ2_CACHE_DIR=str(fairseq2_cache),
        SONAR_LLM_CACHE_DIR=str(cache),
        SONAR_LLM_PUNKT_URL=NLTK_INDEX_URL,
        **proxy_env(nltk_data.url),
    )
    model = ["--model", str(bundle.model), "--asset-dir", str(tmp_path / "cards")]
    cards = ["--encoder", encoder, "--decoder", decoder]
    try:
        proc = _cli(env, "download", *model, *cards)
    finally:
        sonar.close()
        nltk_data.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == []
    # Exactly the files loading reads, each once.
    assert sonar.requests == ["/encoder.pt", "/decoder.pt", "/tokenizer.model"]
    punkt_dir = cache / "nltk_data" / "tokenizers" / "punkt_tab"
    preinstalled = punkt_on_nltk_path()  # this machine has punkt_tab where nltk looks
    if preinstalled is None:
        assert nltk_data.requests == ["/index.xml", "/packages/tokenizers/punkt_tab.zip"]
        punkt = rf"fetched from {re.escape(NLTK_INDEX_URL)}, at {re.escape(str(punkt_dir))}"
    else:
        assert nltk_data.requests == []
        punkt = rf"already installed, at {re.escape(str(preinstalled))}"
    lines = proc.stdout.splitlines()
    size = r"\(\d+(\.\d)? (B|kB|MB|GB)\)"
    for pattern in (
        rf"SONAR-LLM checkpoint {re.escape(str(bundle.model))}: local, nothing to fetch, "
        rf"at .* {size}",
        *(
            rf"SONAR {kind} '{card}': fetched from {sonar.url}/{file}, at "
            rf"{re.escape(str(fairseq2_cache))}/\w+/{file} {size}"
            for kind, card, file in (
                ("encoder", encoder, "encoder.pt"),
                ("decoder", decoder, "decoder.pt"),
                ("tokenizer", encoder, "tokenizer.model"),
            )
        ),
        rf"nltk punkt_tab: {punkt} {size}",
    ):
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
    assert lines[-1].startswith("this host can now run this configuration offline: run it with")
    assert f"FAIRSEQ2_CACHE_DIR={fairseq2_cache}" in lines[-1]
    assert f"SONAR_LLM_CACHE_DIR={cache}" in lines[-1]

    # Both servers are gone: loading works from the caches alone, and splits with punkt_tab.
    proc = _cli(
        env, "generate", "Hello there. The cat runs.", *model, *cards,
        "--max-sentences", "1", "--max-tokens", "8", "--json", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not fetch" not in proc.stderr
    assert f"nltk punkt_tab found at {preinstalled or punkt_dir}" in proc.stderr
    assert len(json.loads(proc.stdout.splitlines()[-1])["sentences"]) == 1
    print(f"punkt_tab source: {'real' if real else 'minimal test model'}")


def test_download_of_a_hub_repo_offline_is_one_line_and_the_rest_still_runs(
    bundle: tiny.Bundle, tmp_path: Path
) -> None:
    cache = tmp_path / "sonar-llm"
    install_fake_punkt_tab(cache / "nltk_data", "dr\n")
    env = _env(SONAR_LLM_CACHE_DIR=str(cache), FAIRSEQ2_CACHE_DIR=str(tmp_path / "fairseq2"))
    repo = "someone/sonar-llm-not-cached"
    proc = _cli(
        env, "download", "--model", repo, "--asset-dir", str(bundle.asset_dir),
        "--encoder", bundle.encoder, "--decoder", bundle.decoder,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert repo in line and "offline" in line and "huggingface.co/" + repo in line
    # The other parts ran: SONAR's local files and the installed punkt_tab are listed.
    out = proc.stdout
    for what in ("SONAR encoder", "SONAR decoder", "SONAR tokenizer", "nltk punkt_tab"):
        assert what in out, (what, out)
    assert "cannot run this configuration offline yet" in out.splitlines()[-1]
    assert "can now run" not in out
