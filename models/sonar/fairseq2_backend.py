"""The `fairseq2` SONAR backend: fairseq2's loaders, tokenizer and encoder pipeline.

It is the reference the native backend is tested against, and it keeps fairseq2's generators
(`Fairseq2Reference.run`) for `SonarCodec.decode(use_fairseq2=True)`. Needs the `fairseq2`
extra (fairseq2, fairseq2n, sonar-space and a libsndfile); nothing imports this module unless
that backend is chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from models.asset_errors import describe, explain
from models.assets import ensure_asset_dirs
from models.sonar.native import SonarParts

T = TypeVar("T")


class Fairseq2Tokenizer:
    """fairseq2's NLLB tokenizer behind the codec's tokenizer interface."""

    def __init__(self, tokenizer: Any) -> None:
        self.ref = tokenizer
        vocab = tokenizer.vocab_info
        self.langs: frozenset[str] = frozenset(getattr(tokenizer, "_langs", ()) or ())
        self.vocab_size: int = vocab.size
        self.eos_idx: int = vocab.eos_idx
        self.pad_idx: int = vocab.pad_idx
        self._text = tokenizer.create_decoder(skip_special_tokens=True)

    def source_ids(self, texts: Sequence[str], lang: str) -> list[list[int]]:
        encode = self.ref.create_encoder(lang=lang)
        return [encode(text).tolist() for text in texts]

    def target_prefix(self, lang: str) -> list[int]:
        encoder = self.ref.create_encoder(
            task="translation", lang=lang, mode="target", device=torch.device("cpu")
        )
        return list(encoder.prefix_indices.tolist())

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        tokens = ids if isinstance(ids, Tensor) else torch.tensor(list(ids), dtype=torch.long)
        return str(self._text(tokens))


class Fairseq2TextEncoder:
    """sonar-space's `TextToEmbeddingModelPipeline`."""

    def __init__(self, model: nn.Module, tokenizer: Any, device: torch.device, dtype: torch.dtype):
        from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline

        self.model = model
        self.pipeline = TextToEmbeddingModelPipeline(model, tokenizer, device=device, dtype=dtype)  # type: ignore[arg-type]
        self.embed_dim = int(model.encoder_frontend.embed.weight.shape[1])  # type: ignore[union-attr, index]

    def encode(self, texts: Sequence[str], lang: str) -> Tensor:
        return self.pipeline.predict(list(texts), source_lang=lang, batch_size=len(texts))

    def modules(self) -> list[nn.Module]:
        return [self.model]


class Fairseq2Reference:
    """fairseq2's beam-search and sampling generators over the loaded decoder."""

    def __init__(self, decoder: nn.Module, tokenizer: Any, dtype: torch.dtype) -> None:
        from sonar.models.sonar_translation import SonarEncoderDecoderModel
        from sonar.models.sonar_translation.model import DummyEncoderModel

        self.model = SonarEncoderDecoderModel(DummyEncoderModel(), decoder).eval()  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.dtype = dtype

    def run(
        self,
        embeddings: Tensor,
        lang: str,
        *,
        beam_size: int,
        max_seq_len: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
    ) -> list[tuple[str, int, float]]:
        """(text, number of tokens, score) per row, as the reference's pipeline decodes."""
        from fairseq2.generation.beam_search.generator import BeamSearchSeq2SeqGenerator
        from fairseq2.generation.sampling import SamplingSeq2SeqGenerator, TopKSampler, TopPSampler
        from fairseq2.nn import BatchLayout
        from sonar.inference_pipelines.text import precision_context
        from sonar.inference_pipelines.utils import SequenceToTextConverter

        vocab = self.tokenizer.vocab_info
        generator: object
        if temperature > 0:
            sampler = TopKSampler(top_k) if top_k else TopPSampler(top_p or 1.0)
            generator = SamplingSeq2SeqGenerator(
                self.model, vocab, sampler, temperature=temperature, max_seq_len=max_seq_len
            )
        else:
            generator = BeamSearchSeq2SeqGenerator(
                self.model, vocab, beam_size=beam_size, max_seq_len=max_seq_len
            )
        converter = SequenceToTextConverter(
            generator,  # type: ignore[arg-type]
            self.tokenizer,
            task="translation",
            target_lang=lang,
            mode="target",
        )
        with precision_context(self.dtype):
            texts, output = converter.batch_convert(embeddings, BatchLayout.of(embeddings))
        return [
            (t, int(h[0].seq.numel()), float(h[0].score or 0.0))
            for t, h in zip(texts, output.hypotheses, strict=True)
        ]


def load_fairseq2(
    names: tuple[str, str, str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    asset_dirs: Iterable[Path | str] = (),
    say: Callable[[str], None] = lambda _msg: None,
) -> SonarParts:
    """Encoder, decoder and tokenizer through fairseq2's asset store and loaders."""
    dirs = list(asset_dirs)
    start = time.perf_counter()
    say("fairseq2 asset cards ...")  # fairseq2's first initialisation takes seconds
    ensure_asset_dirs(dirs)
    say(f"... asset cards ready in {time.perf_counter() - start:.1f} s")
    from fairseq2.data.tokenizers import load_tokenizer
    from fairseq2.models import load_model

    def step(kind: str, name: str, load: Callable[[str], T]) -> T:
        size = describe(name, kind)
        say(f"SONAR {kind} {name}{' ' + size if size else ''} ...")
        start = time.perf_counter()
        try:
            loaded = load(name)
        except Exception as e:
            explained = explain(kind, name, e, dirs)
            if explained is None:
                raise
            raise explained from e
        say(f"... SONAR {kind} done in {time.perf_counter() - start:.1f} s")
        return loaded

    # fairseq2 builds the model empty in `dtype` (meta, then allocated) and copies the
    # checkpoint into it tensor by tensor; memory-mapped, the fp32 file is read through the
    # page cache instead of becoming a second full copy in the process's own memory.
    def model(n: str) -> nn.Module:
        return load_model(n, device=device, dtype=dtype, mmap=True).eval()

    enc_name, dec_name, tok_name = names
    enc = step("encoder", enc_name, model)
    dec = step("decoder", dec_name, model)
    tok = step("tokenizer", tok_name, load_tokenizer)
    return SonarParts(
        Fairseq2TextEncoder(enc, tok, device, dtype),
        dec,
        Fairseq2Tokenizer(tok),
        Fairseq2Reference(dec, tok, dtype),
    )
