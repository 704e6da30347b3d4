"""Small helpers the tests share (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import torch

from models import tiny
from models.generate import GenerationOptions
from models.pipeline import SonarLLMPipeline
from models.sonar_codec import DecodeOptions, SonarCodec
from server.engine import LLM, Engine, FinalEvent, GenerationRequest, SentenceEvent

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """The script `bench/<name>.py` as a module (bench/ is not a package), as `bench_<name>`."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def install_fake_punkt_tab(root: Path, abbreviations: str) -> Path:
    """A minimal punkt_tab "english" model under ``root`` (the real one cannot be fetched)."""
    model = root / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    (model / "abbrev_types.txt").write_text(abbreviations, encoding="utf-8")
    for name in ("sent_starters.txt", "collocations.tab", "ortho_context.tab"):
        (model / name).write_text("", encoding="utf-8")
    return model


# Short sentences keep the suite fast; everything else is the reference default.
FAST_DECODE = DecodeOptions(max_tokens=40)


def fast_options(**kwargs: object) -> GenerationOptions:
    kwargs.setdefault("decode", FAST_DECODE)
    return GenerationOptions(**kwargs)  # type: ignore[arg-type]


PROMPTS = [
    "Hello there.",
    "The cat runs home. It is late. The moon is up.",
    "A small dog sees the moon today.",
    "One. Two. Three. Four. Five. Six. Seven.",
    "Why? Because.",
    "Mother reads a book. Father sings a song.",
    "The old city was dark and the road was long",
    "Night falls. Stars appear. The river sings. A bird sleeps. The wind stops.",
    "Begin again.",
]


def options(i: int) -> GenerationOptions:
    """Mixed settings: lengths and beam sizes differ between requests in one batch."""
    return fast_options(
        max_sentences=2 + i % 4,
        decode=DecodeOptions(max_tokens=24 + 8 * (i % 3), beam_size=1 + i % 3),
    )


def single(pipe: SonarLLMPipeline, prompt: str, opts: GenerationOptions) -> FinalEvent:
    final = list(LLM(pipe).stream(prompt, opts))[-1]
    assert isinstance(final, FinalEvent)
    return final


async def collect(events: AsyncIterator[object]) -> tuple[list[SentenceEvent], FinalEvent]:
    sentences: list[SentenceEvent] = []
    async for ev in events:
        if isinstance(ev, FinalEvent):
            return sentences, ev
        assert isinstance(ev, SentenceEvent)
        sentences.append(ev)
    raise AssertionError("stream ended without a final event")


async def submit(eng: Engine, prompt: str | list[str], opts: GenerationOptions, **kw: object):  # type: ignore[no-untyped-def]
    return await eng.submit(eng.prepare(GenerationRequest(prompt, opts, **kw)))  # type: ignore[arg-type]


def embeddings(codec: SonarCodec, n: int = 40, seed: int = 3) -> torch.Tensor:
    """Encoded sentences plus points around them: inputs whose sentences end at varied lengths."""
    corpus = tiny._corpus(random.Random(seed), n)[:n]
    enc = codec.encode(corpus, "eng_Latn")
    g = torch.Generator().manual_seed(seed)
    noisy = enc[: n // 2] + 0.3 * torch.randn(enc[: n // 2].shape, generator=g) * enc.std()
    return torch.cat([enc, noisy])
