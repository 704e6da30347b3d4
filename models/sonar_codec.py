"""SONAR text codec: sentences to 1024-d embeddings and back, in batches (sonar-space/fairseq2).

Components are named by fairseq2 asset cards, so the released `text_sonar_basic_*` models, a
local copy described by a card in `$FAIRSEQ2_USER_ASSET_DIR`, and the demo bundle load the same
way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from models.asset_errors import describe, explain
from models.assets import ensure_asset_dirs
from models.beam_search import (
    BeamRequest,
    DecodeBatch,
    DecodedSeq,
    SonarDecoderStack,
    decode_all,
)
from models.errors import GenerationError
from models.paged import PagePool
from models.sampling import Sampling
from models.sonar.decoder import native_decoder

log = logging.getLogger("sonar_llm.codec")
T = TypeVar("T")

DEFAULT_ENCODER = "text_sonar_basic_encoder"
DEFAULT_DECODER = "text_sonar_basic_decoder"
DEFAULT_TOKENIZER = "text_sonar_basic_encoder"

# The reference bounds each decoded sentence with max_seq_len=256 (fairseq2's max_gen_len default
# of 1 × source length + 128 is larger for a 1024-d embedding, so 256 is the bound that acts).
DEFAULT_MAX_TOKENS = 256
MIN_MAX_TOKENS = 3
MIN_TEMPERATURE = 1e-3


class UnknownLanguageError(ValueError):
    """A language code the SONAR tokenizer does not know."""


@functools.cache
def sonar_languages() -> frozenset[str]:
    """The released SONAR tokenizer's languages, read from sonar-space's own asset card."""
    from importlib.resources import files

    import yaml

    text = (files("sonar.cards") / "text_sonar_basic_encoder.yaml").read_text()
    return frozenset(yaml.safe_load(text)["tokenizer_config"]["_set_"]["langs"])


@dataclass(frozen=True)
class DecodeOptions:
    """How the SONAR decoder turns an embedding into text.

    `temperature == 0` means beam search (the reference, beam 5); a positive temperature samples
    tokens, with `top_p` or `top_k` if given, reproducibly when `seed` is set.
    """

    beam_size: int = 5
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise GenerationError("beam_size", f"must be >= 1, got {self.beam_size}")
        if self.max_tokens < MIN_MAX_TOKENS:
            # The decoder's target prefix (`</s> __lang__`) already takes two positions.
            raise GenerationError(
                "max_tokens", f"must be >= {MIN_MAX_TOKENS}, got {self.max_tokens}"
            )
        if not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            # Dividing logits by a near-zero temperature overflows to NaN probabilities.
            raise GenerationError(
                "temperature",
                f"must be 0 (beam search) or at least {MIN_TEMPERATURE}, got {self.temperature}",
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError("top_k", f"must be >= 1, got {self.top_k}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def batch_key(self) -> tuple[object, ...]:
        """Rows whose keys are equal can share one beam-search call."""
        return (self.beam_size, self.max_tokens)


@dataclass(frozen=True)
class Decoded:
    text: str
    num_tokens: int
    score: float = 0.0  # the hypothesis' length-normalised log-probability (beam search)


class SonarCodec:
    """Batched `encode(texts, lang)` and `decode(embeddings, lang, options)`."""

    def __init__(
        self,
        encoder: torch.nn.Module,
        decoder: torch.nn.Module,
        tokenizer: object,
        *,
        device: torch.device,
        dtype: torch.dtype,
        names: tuple[str, str, str] = ("", "", ""),
    ) -> None:
        from sonar.inference_pipelines.text import TextToEmbeddingModelPipeline
        from sonar.models.sonar_translation import SonarEncoderDecoderModel
        from sonar.models.sonar_translation.model import DummyEncoderModel

        self.device = device
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.names = names
        self._encoder_pipeline = TextToEmbeddingModelPipeline(
            encoder,  # type: ignore[arg-type]
            tokenizer,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
        )
        self._decoder_model = SonarEncoderDecoderModel(
            DummyEncoderModel(),  # type: ignore[arg-type]
            decoder,  # type: ignore[arg-type]
        ).eval()
        self.embed_dim = int(decoder.decoder_frontend.embed.weight.shape[1])  # type: ignore[union-attr, index]
        self.langs: frozenset[str] = frozenset(getattr(tokenizer, "_langs", ()) or ())
        vocab = tokenizer.vocab_info  # type: ignore[attr-defined]
        self.eos_idx: int = vocab.eos_idx
        self.pad_idx: int | None = vocab.pad_idx
        # Our batched decoder (models.beam_search) over the decoder's own tensors; another
        # architecture is refused (UnsupportedDecoder, saying what differs).
        self.decoder_stack = SonarDecoderStack(native_decoder(decoder))
        self._text_decoder = tokenizer.create_decoder(skip_special_tokens=True)  # type: ignore[attr-defined]
        self._prefixes: dict[str, list[int]] = {}

    @classmethod
    def load(
        cls,
        encoder: str = DEFAULT_ENCODER,
        decoder: str = DEFAULT_DECODER,
        tokenizer: str = DEFAULT_TOKENIZER,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        asset_dirs: Iterable[Path | str] = (),
        progress: Callable[[str], None] | None = None,
    ) -> SonarCodec:
        """Load encoder, decoder and tokenizer by asset-card name.

        `progress` hears one line before and after each (with the file's size); a card that is
        unknown, a file that is missing or cannot be downloaded raises SonarAssetError (one
        line saying what was wanted and how to provide it).
        """
        dirs = list(asset_dirs)
        say = progress or (lambda _msg: None)
        start = time.perf_counter()
        say("fairseq2 asset cards ...")  # fairseq2's first initialisation takes seconds
        ensure_asset_dirs(dirs)
        say(f"... asset cards ready in {time.perf_counter() - start:.1f} s")
        from fairseq2.data.tokenizers import load_tokenizer
        from fairseq2.models import load_model

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

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
        def model(n: str) -> torch.nn.Module:
            return load_model(n, device=dev, dtype=dtype, mmap=True).eval()

        enc = step("encoder", encoder, model)
        dec = step("decoder", decoder, model)
        tok = step("tokenizer", tokenizer, load_tokenizer)
        return cls(enc, dec, tok, device=dev, dtype=dtype, names=(encoder, decoder, tokenizer))

    # ----- languages ---------------------------------------------------------------------
    def check_lang(self, lang: str) -> None:
        """Raise UnknownLanguageError unless the tokenizer has `lang` (e.g. `eng_Latn`)."""
        if self.langs and lang not in self.langs:
            raise UnknownLanguageError(
                f"unknown language {lang!r}: use a SONAR/NLLB code such as eng_Latn, fra_Latn"
            )

    # ----- encode ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, texts: Sequence[str], lang: str) -> Tensor:
        """Embed `texts` in one batch; returns fp32 [N, embed_dim] on the codec's device."""
        self.check_lang(lang)
        if not texts:
            return torch.zeros((0, self.embed_dim), device=self.device)
        emb = self._encoder_pipeline.predict(list(texts), source_lang=lang, batch_size=len(texts))
        return emb.float()

    # ----- decode ------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        embeddings: Tensor,
        lang: str | Sequence[str],
        options: DecodeOptions | Sequence[DecodeOptions] = DecodeOptions(),
        *,
        use_fairseq2: bool = False,
    ) -> list[Decoded]:
        """Decode each row, all in one batched decode (`models.beam_search`): beam-search rows
        and sampled rows alike (a seeded row draws from its own stream, so it gives the same
        text whatever else is in the batch). With `use_fairseq2`, fairseq2's generators decode
        instead (the reference): one call per language and beam setting, sampled rows one at a
        time under their own seed."""
        n = embeddings.shape[0]
        langs = [lang] * n if isinstance(lang, str) else list(lang)
        opts = [options] * n if isinstance(options, DecodeOptions) else list(options)
        if len(langs) != n or len(opts) != n:
            raise ValueError("decode needs one language and one option set per embedding")
        for lg in set(langs):
            self.check_lang(lg)
        embeddings = embeddings.to(device=self.device, dtype=self.dtype)
        out: list[Decoded | None] = [None] * n
        groups: dict[tuple[object, ...], list[int]] = {}
        beam_rows: list[int] = []
        for i, (lg, o) in enumerate(zip(langs, opts, strict=True)):
            if not use_fairseq2:
                beam_rows.append(i)
            elif o.sampling:
                with _seeded(o.seed, self.device):
                    out[i] = self._run(embeddings[i : i + 1], lg, o)[0]
            else:
                groups.setdefault((lg, *o.batch_key()), []).append(i)
        if beam_rows:
            requests = [self.beam_request(i, embeddings[i], langs[i], opts[i]) for i in beam_rows]
            for i, seq in zip(beam_rows, decode_all(self.new_batch(), requests), strict=True):
                out[i] = self.to_decoded(seq)
        for rows in groups.values():
            results = self._run(embeddings[rows], langs[rows[0]], opts[rows[0]])
            for i, r in zip(rows, results, strict=True):
                out[i] = r
        return [d for d in out if d is not None]

    # ----- batched beam search (models.beam_search) -----------------------------------------
    def new_batch(self, pool: PagePool | None = None, owner: str = "decoder") -> DecodeBatch:
        """An empty persistent decode batch over this codec's decoder, its cache in `pool`'s
        pages tagged `owner` (no pool: a private one, sized to the beams it holds)."""
        return DecodeBatch(self.decoder_stack, self.eos_idx, self.pad_idx, pool, owner)

    def beam_request(
        self, key: Hashable, embedding: Tensor, lang: str, o: DecodeOptions
    ) -> BeamRequest:
        """What `DecodeBatch.add` needs to decode `embedding` the way fairseq2 would."""
        prefix = self._prefixes.get(lang)
        if prefix is None:
            self.check_lang(lang)
            encoder = self.tokenizer.create_encoder(  # type: ignore[attr-defined]
                task="translation", lang=lang, mode="target", device=torch.device("cpu")
            )
            prefix = self._prefixes[lang] = encoder.prefix_indices.tolist()
        # fairseq2's bound: max_seq_len, the decoder's own limit, and prefix + 1 × source length
        # + 128 (the source being the embedding, `embed_dim` long as the reference lays it out).
        max_seq_len = min(
            o.max_tokens,
            self.decoder_stack.max_target_seq_len,
            len(prefix) + self.embed_dim + 128,
        )
        # fairseq2's samplers take top-k when it is set, else top-p.
        sampling = (
            Sampling(o.temperature, None if o.top_k else o.top_p, o.top_k, o.seed)
            if o.sampling
            else None
        )
        return BeamRequest(
            key,
            embedding.to(device=self.device, dtype=self.dtype),
            prefix,
            1 if sampling else o.beam_size,
            max_seq_len,
            sampling,
        )

    def to_decoded(self, seq: DecodedSeq) -> Decoded:
        tokens = torch.tensor(seq.tokens, dtype=torch.long)
        return Decoded(text=self._text_decoder(tokens), num_tokens=len(seq.tokens), score=seq.score)

    def _run(self, embeddings: Tensor, lang: str, o: DecodeOptions) -> list[Decoded]:
        from fairseq2.generation.beam_search.generator import BeamSearchSeq2SeqGenerator
        from fairseq2.generation.sampling import (
            SamplingSeq2SeqGenerator,
            TopKSampler,
            TopPSampler,
        )
        from fairseq2.nn import BatchLayout
        from sonar.inference_pipelines.text import precision_context
        from sonar.inference_pipelines.utils import SequenceToTextConverter

        vocab = self.tokenizer.vocab_info  # type: ignore[attr-defined]
        # The same generator arguments as the reference's pipeline call (`max_seq_len=256`).
        generator: object
        if o.sampling:
            sampler = TopKSampler(o.top_k) if o.top_k else TopPSampler(o.top_p or 1.0)
            generator = SamplingSeq2SeqGenerator(
                self._decoder_model,
                vocab,
                sampler,
                temperature=o.temperature,
                max_seq_len=o.max_tokens,
            )
        else:
            generator = BeamSearchSeq2SeqGenerator(
                self._decoder_model, vocab, beam_size=o.beam_size, max_seq_len=o.max_tokens
            )
        converter = SequenceToTextConverter(
            generator,  # type: ignore[arg-type]
            self.tokenizer,  # type: ignore[arg-type]
            task="translation",
            target_lang=lang,
            mode="target",
        )
        with precision_context(self.dtype):
            texts, output = converter.batch_convert(embeddings, BatchLayout.of(embeddings))
        return [
            Decoded(text=t, num_tokens=int(h[0].seq.numel()), score=float(h[0].score or 0.0))
            for t, h in zip(texts, output.hypotheses, strict=True)
        ]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run under a private RNG state seeded with `seed` (no effect on the global stream)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
