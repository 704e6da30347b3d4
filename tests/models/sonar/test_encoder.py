"""The native SONAR text encoder embeds as sonar-space's pipeline does (fp32, max |Δ| ≤ 1e-5).

Batched with padding, several languages, empty and over-long sentences (cut at the encoder's
cap as the pipeline cuts them). The tiny bundle here; the released size with `-m full`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from models import tiny
from models.sonar.cards import CardStore
from models.sonar.encoder import SonarTextEncoder
from models.sonar.loading import load_encoder, load_tokenizer
from models.sonar.tokenizer import NllbTokenizer

TEXTS = [
    "Hello world.",
    "",
    "The quick brown fox jumps over the lazy dog, twice; naïve café.",
    "word " * 600,  # over the 512-token cap
    "日本語のテキスト。",
    "Short.",
]
CPU = torch.device("cpu")


def _native(asset_dir: Path, name: str) -> tuple[SonarTextEncoder, NllbTokenizer]:
    store = CardStore.discover([asset_dir])
    enc = load_encoder(store, name, device=CPU, dtype=torch.float32)
    return enc, load_tokenizer(store, name)


def _reference(asset_dir: Path, name: str) -> Any:
    from fairseq2.data.tokenizers import load_tokenizer as fs2_tokenizer
    from fairseq2.models import load_model
    from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline

    from models.assets import ensure_asset_dirs

    ensure_asset_dirs([asset_dir])
    model = load_model(name, device=CPU, dtype=torch.float32, mmap=True).eval()
    return TextToEmbeddingModelPipeline(model, fs2_tokenizer(name), device=CPU, dtype=torch.float32)


def _compare(asset_dir: Path, name: str, texts: list[str], langs: list[str]) -> float:
    enc, tok = _native(asset_dir, name)
    ref = _reference(asset_dir, name)
    worst = 0.0
    for lang in langs:
        ids, lengths = tok.batch(texts, lang, enc.max_seq_len)
        with torch.inference_mode():
            mine = enc(ids, lengths)
        with pytest.warns(UserWarning, match="truncated"):
            theirs = ref.predict(texts, source_lang=lang, batch_size=len(texts))
        assert mine.shape == theirs.shape == (len(texts), enc.model_dim)
        assert mine.dtype == torch.float32
        worst = max(worst, float((mine - theirs).abs().max()))
        # One sentence alone embeds as it does in the padded batch.
        with torch.inference_mode():
            alone = enc(*tok.batch(texts[:1], lang, enc.max_seq_len))
        assert torch.allclose(alone[0], mine[0], atol=1e-5, rtol=0)
    return worst


def test_tiny_encoder_equals_the_pipeline(bundle: tiny.Bundle, fairseq2_reference: None) -> None:
    worst = _compare(bundle.asset_dir, bundle.encoder, TEXTS, ["eng_Latn", "fra_Latn", "zul_Latn"])
    assert worst <= 1e-5


def test_tiny_encoder_loads_without_a_second_copy(bundle: tiny.Bundle) -> None:
    """bf16 from the fp32 file: every parameter converted, none left on the meta device, and
    none a view of the memory-mapped file."""
    store = CardStore.discover([bundle.asset_dir])
    enc = load_encoder(store, bundle.encoder, device=CPU, dtype=torch.bfloat16)
    params = list(enc.parameters())
    assert params and all(p.dtype == torch.bfloat16 and not p.is_meta for p in params)
    tok = load_tokenizer(store, bundle.tokenizer)
    with torch.inference_mode():
        out = enc(*tok.batch(["Hello world."], "eng_Latn", enc.max_seq_len))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.full
@pytest.mark.timeout(1800)  # two 3 GB encoders loaded on a small CPU
def test_full_size_encoder_equals_the_pipeline(
    full_bundle_dir: Path, fairseq2_reference: None
) -> None:
    bundle = tiny.Bundle.open(full_bundle_dir)
    worst = _compare(bundle.asset_dir, bundle.encoder, TEXTS, ["eng_Latn", "deu_Latn"])
    assert worst <= 1e-5
