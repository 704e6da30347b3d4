"""Everything one needs to generate: the SONAR-LLM network and the SONAR codec, loaded together.

With no model named, the demo bundle (random weights, see `models.tiny`) is built once in the
cache folder and used, so the project runs end to end on a machine without any download.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import torch
from torch import Tensor

from models import tiny
from models.cache_dir import default_cache_dir
from models.checkpoint import CheckpointError, LoadReport, load_sonar_llm
from models.options import BEGIN_TEXT, GenerationError, GenerationOptions
from models.punkt_data import ensure_punkt_tab
from models.sonar_codec import (
    DEFAULT_BACKEND,
    DEFAULT_DECODER,
    DEFAULT_ENCODER,
    DEFAULT_TOKENIZER,
    SonarCodec,
    UnknownLanguageError,
)
from models.sonar_llm import SonarLLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

logger = logging.getLogger("sonar_llm.pipeline")

#: CPU feature flags (Linux /proc/cpuinfo names) that give a half-precision type native matmuls.
#: Without one, oneDNN/MKL convert to float32 and back around every matmul: slower than float32
#: (measured on an AVX2-only EPYC: bf16 9 vs fp32 26 GFLOP/s for [80, 1024] x [1024, 4096]).
NATIVE_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def slow_cpu_dtype(dtype: torch.dtype, flags: set[str] | None) -> str | None:
    """Why `dtype` would be slow on a CPU with `flags` (None: fine, or cannot tell)."""
    wanted = NATIVE_CPU_FLAGS.get(dtype)
    if wanted is None or flags is None or flags & set(wanted):
        return None
    name = str(dtype).removeprefix("torch.")
    return (
        f"dtype {name} on a CPU without {' or '.join(wanted)}: its matrix products are "
        f"emulated and usually slower than float32 here; --dtype float32 is the faster choice "
        f"on this machine"
    )


def demo_bundle(cache_dir: Path | None = None) -> tiny.Bundle:
    """The demo bundle in the cache folder, built on first use."""
    root = (cache_dir or default_cache_dir()) / "demo-bundle"
    if not tiny.is_bundle(root):
        # Build aside and rename, so concurrent first runs never see a half-written bundle.
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        tiny.build(tmp)
        try:
            tmp.rename(root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return tiny.Bundle.open(root)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class ModelOptions(Protocol):
    """Where the model comes from: `sonar-llm generate` flags and the server's settings."""

    # Read-only, so narrower types (a Literal dtype) match too.
    @property
    def model(self) -> str | None: ...
    @property
    def config(self) -> str | None: ...
    @property
    def encoder(self) -> str | None: ...
    @property
    def decoder(self) -> str | None: ...
    @property
    def tokenizer(self) -> str | None: ...
    @property
    def device(self) -> str | None: ...
    @property
    def dtype(self) -> str: ...
    @property
    def asset_dir(self) -> list[str]: ...
    @property
    def punkt_url(self) -> str: ...
    @property
    def sonar_backend(self) -> str: ...


@dataclass(frozen=True)
class Sources:
    """What a configuration loads: the SONAR-LLM checkpoint and SONAR's asset cards."""

    model: str | Path  # checkpoint dir, repo id or training .pt
    encoder: str
    decoder: str
    tokenizer: str
    asset_dirs: list[Path | str]
    demo: bool = False

    @classmethod
    def resolve(
        cls,
        model: str | Path | None,
        encoder: str | None = None,
        decoder: str | None = None,
        tokenizer: str | None = None,
        asset_dirs: Iterable[Path | str] = (),
    ) -> Sources:
        """No model: the demo bundle (built on first use); a bundle brings its own cards."""
        dirs = list(asset_dirs)
        demo = model is None
        if model is None or tiny.is_bundle(model):
            bundle = demo_bundle() if model is None else tiny.Bundle.open(model)
            model = bundle.model
            dirs.append(bundle.asset_dir)
            encoder = encoder or bundle.encoder
            decoder = decoder or bundle.decoder
            tokenizer = tokenizer or bundle.tokenizer
        return cls(
            model=model,
            encoder=encoder or DEFAULT_ENCODER,
            decoder=decoder or DEFAULT_DECODER,
            # The released tokenizer card is the encoder's; a custom encoder card brings its own.
            tokenizer=tokenizer or encoder or DEFAULT_TOKENIZER,
            asset_dirs=dirs,
            demo=demo,
        )


@dataclass
class SonarLLMPipeline:
    """The loaded model, its codec and what was loaded from where."""

    model: SonarLLM
    codec: SonarCodec
    report: LoadReport
    demo: bool = False
    _eos_cache: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        config: str | Path | None = None,
        encoder: str | None = None,
        decoder: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        asset_dirs: Iterable[Path | str] = (),
        progress: Callable[[str], None] | None = None,
        sonar_backend: str = DEFAULT_BACKEND,
    ) -> SonarLLMPipeline:
        """Load a checkpoint (dir, repo id or training .pt) and SONAR; no model: the demo bundle."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype)
        if dev.type == "cpu" and (why := slow_cpu_dtype(dt, cpu_flags())) is not None:
            logger.warning(why)
        src = Sources.resolve(model, encoder, decoder, tokenizer, asset_dirs)
        llm, report = load_sonar_llm(
            src.model, config=config, device=dev, dtype=dt, progress=progress, keep_token_head=False
        )
        codec = SonarCodec.load(
            src.encoder,
            src.decoder,
            src.tokenizer,
            device=dev,
            dtype=dt,
            asset_dirs=src.asset_dirs,
            progress=progress,
            backend=sonar_backend,
        )
        if codec.embed_dim != llm.config.embed_dim:
            raise CheckpointError(
                f"SONAR embeddings are {codec.embed_dim}-d but the model expects "
                f"{llm.config.embed_dim}-d (embed_dim in its config)"
            )
        return cls(model=llm, codec=codec, report=report, demo=src.demo)

    @classmethod
    def from_options(
        cls, opts: ModelOptions, progress: Callable[[str], None] | None = None
    ) -> SonarLLMPipeline:
        """Load from the model options the CLI and the server share (flags, settings).

        Also makes sure nltk's punkt_tab data is there for sentence splitting: fetched once into
        the cache folder when missing, the built-in fallback (and one warning) when it cannot be.
        """
        punkt = ensure_punkt_tab(opts.punkt_url)  # a failure is logged as one warning
        if progress is not None:
            if punkt.path is not None:
                what = "fetched into" if punkt.state == "fetched" else "found at"
                progress(f"nltk punkt_tab {what} {punkt.path}")
            elif punkt.state == "disabled":
                progress("nltk punkt_tab is not installed (fetching turned off): fallback splitter")
        return cls.load(
            opts.model,
            config=opts.config,
            encoder=opts.encoder,
            decoder=opts.decoder,
            tokenizer=opts.tokenizer,
            device=opts.device,
            dtype=opts.dtype,
            asset_dirs=opts.asset_dir,
            progress=progress,
            sonar_backend=opts.sonar_backend,
        )

    def check_options(self, opts: GenerationOptions) -> None:
        """Raise GenerationError for options this model cannot serve (unknown languages)."""
        for name in ("source_lang", "target_lang"):
            try:
                self.codec.check_lang(getattr(opts, name))
            except UnknownLanguageError as e:
                raise GenerationError(name, str(e)) from None

    def eos_embedding(self, text: str) -> Tensor:
        """The EOS sentence's embedding (English, as the reference encodes it), cached."""
        with self._lock:
            if text not in self._eos_cache:
                self._eos_cache[text] = self.codec.encode([text], "eng_Latn")[0]
                if len(self._eos_cache) > 64:
                    self._eos_cache.pop(next(iter(self._eos_cache)))
            return self._eos_cache[text]

    def encode_prompt(self, sentences: list[str], lang: str, add_begin: bool) -> Tensor:
        """[T, D] context: "Begin of text." is English whatever the prompt's language."""
        if add_begin and sentences and sentences[0] == BEGIN_TEXT:
            begin = self.codec.encode([BEGIN_TEXT], "eng_Latn")
            return torch.cat([begin, self.codec.encode(sentences[1:], lang)])
        return self.codec.encode(sentences, lang)


def warn_demo(stream: TextIO = sys.stderr) -> None:
    print(
        "note: no model configured; using the built-in demo bundle (random weights): "
        "its output is gibberish. Pass --model to serve a real SONAR-LLM checkpoint.",
        file=stream,
    )
