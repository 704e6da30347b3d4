"""Both SONAR backends load the same cards into the same codec behaviour; `native` needs no
fairseq2 at all (a process where fairseq2, fairseq2n and sonar cannot be imported serves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions, SonarCodec
from server.engine import LLM

TEXTS = ["Hello world.", "", "The cat runs home, naïve café.", "word " * 600, "日本語。"]
PROMPTS = ["Hello there. The cat runs home.", "A small dog sees the moon today."]

# Put first on PYTHONPATH, this makes fairseq2, fairseq2n and sonar unimportable in the process.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {"fairseq2", "fairseq2n", "sonar"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Blocker())
"""


def _codec(bundle: tiny.Bundle, backend: str) -> SonarCodec:
    return SonarCodec.load(
        bundle.encoder,
        bundle.decoder,
        bundle.tokenizer,
        device="cpu",
        asset_dirs=[bundle.asset_dir],
        backend=backend,
    )


def test_native_codec_equals_the_fairseq2_codec(
    bundle: tiny.Bundle, fairseq2_reference: None
) -> None:
    native, ref = _codec(bundle, "native"), _codec(bundle, "fairseq2")
    assert (native.langs, native.eos_idx, native.pad_idx, native.vocab_size) == (
        ref.langs,
        ref.eos_idx,
        ref.pad_idx,
        ref.vocab_size,
    )
    for lang in ("eng_Latn", "fra_Latn"):
        mine, theirs = native.encode(TEXTS, lang), ref.encode(TEXTS, lang)
        assert float((mine - theirs).abs().max()) <= 1e-5
        assert native.beam_request(0, mine[0], lang, DecodeOptions()).prefix == list(
            ref.beam_request(0, theirs[0], lang, DecodeOptions()).prefix
        )
    embs = native.encode(TEXTS, "eng_Latn")
    opts = DecodeOptions(max_tokens=40)
    got = native.decode(embs, "eng_Latn", opts)
    want = ref.decode(embs, "eng_Latn", opts, use_fairseq2=True)
    assert [d.text for d in got] == [d.text for d in want]
    for d, w in zip(got, want, strict=True):
        assert d.num_tokens == w.num_tokens
        assert d.score == pytest.approx(w.score, rel=1e-5, abs=1e-6)


def test_both_backends_generate_the_same_sentences(
    bundle: tiny.Bundle, fairseq2_reference: None
) -> None:
    opts = GenerationOptions(max_sentences=3, decode=DecodeOptions(max_tokens=40))
    out = {}
    for backend in ("native", "fairseq2"):
        pipe = SonarLLMPipeline.load(bundle.root, device="cpu", sonar_backend=backend)
        out[backend] = LLM(pipe).generate(PROMPTS, opts)
    assert [f.sentences for f in out["native"]] == [f.sentences for f in out["fairseq2"]]


def test_generate_runs_with_fairseq2_and_sonar_unimportable(
    bundle: tiny.Bundle, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["SONAR_LLM_SONAR_BACKEND"] = "native"
    probe = subprocess.run(
        [sys.executable, "-c", "import fairseq2"], env=env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the blocker works
    cli = [sys.executable, "-m", "server.cli", "generate", "--model", str(bundle.root)]
    done = subprocess.run(
        [*cli, "--max-sentences", "2", "--max-tokens", "24", "--json", PROMPTS[0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["sentences"]) == 2
    # Sampled decoding too: it runs inside the batched decoder step.
    sampled = ["--max-sentences", "1", "--max-tokens", "16", "--temperature", "0.8", "--seed", "3"]
    done = subprocess.run(
        [*cli, *sampled, "--json", PROMPTS[1]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert torch.__version__  # the native path needs only torch (and sentencepiece, yaml)
