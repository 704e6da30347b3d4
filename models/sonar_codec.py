"""SONAR text codec: sentences to 1024-d embeddings and back, in batches.

Components are named by fairseq2 asset cards, so the released `text_sonar_basic_*` models, a
local copy described by a card in `$FAIRSEQ2_USER_ASSET_DIR`, and the demo bundle load the same
way. Two backends load them: `native` (`models.sonar`: plain PyTorch and `sentencepiece`, no
fairseq2) and `fairseq2` (fairseq2's loaders, tokenizer and encoder pipeline: the reference).
Both decode through the same batched search (`models.decode_batch`) over the same decoder
weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, get_args

import torch
from torch import Tensor

from models.beam_rules import DecodedSeq
from models.block_manager import BlockManager, page_bytes_for
from models.decode_batch import BeamRequest, DecodeBatch, beam_pages, decode_all
from models.decoder_stack import SonarDecoderStack
from models.errors import GenerationError
from models.sampling import Sampling
from models.sonar.decoder import native_decoder
from models.sonar.native import CodecTokenizer, SonarParts, TextEncoder

log = logging.getLogger("sonar_llm.codec")
T = TypeVar("T")

DEFAULT_ENCODER = "text_sonar_basic_encoder"
DEFAULT_DECODER = "text_sonar_basic_decoder"
DEFAULT_TOKENIZER = "text_sonar_basic_encoder"
# Which code loads and runs SONAR (see the module docstring); the default is written here once.
SonarBackend = Literal["native", "fairseq2"]
BACKENDS: tuple[str, ...] = get_args(SonarBackend)
DEFAULT_BACKEND: SonarBackend = "native"

# The reference bounds each decoded sentence with max_seq_len=256 (fairseq2's max_gen_len default
# of 1 × source length + 128 is larger for a 1024-d embedding, so 256 is the bound that acts).
DEFAULT_MAX_TOKENS = 256
MIN_MAX_TOKENS = 3
MIN_TEMPERATURE = 1e-3


class UnknownLanguageError(ValueError):
    """A language code the SONAR tokenizer does not know."""


@functools.cache
def sonar_languages() -> frozenset[str]:
    """The released SONAR tokenizer's languages, from its asset card (shipped in `models.sonar`)."""
    from importlib.resources import files

    import yaml

    card = files("models.sonar") / "released_cards" / f"{DEFAULT_TOKENIZER}.yaml"
    return frozenset(yaml.safe_load(card.read_text())["tokenizer_config"]["_set_"]["langs"])


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
        parts: SonarParts,
        *,
        device: torch.device,
        dtype: torch.dtype,
        names: tuple[str, str, str] = ("", "", ""),
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.names = names
        self.backend = backend
        self.text_encoder: TextEncoder = parts.encoder
        self.tokenizer: CodecTokenizer = parts.tokenizer
        # fairseq2's generators over the same decoder (fairseq2 backend only): the reference.
        self.reference = parts.reference
        self.embed_dim = parts.encoder.embed_dim
        self.langs: frozenset[str] = frozenset(self.tokenizer.langs)
        self.eos_idx: int = self.tokenizer.eos_idx
        self.pad_idx: int | None = self.tokenizer.pad_idx
        self.vocab_size: int = self.tokenizer.vocab_size
        # Our batched decoder (models.decode_batch) over the decoder's own tensors (a fairseq2
        # decoder's are handed over, not copied); another architecture is refused
        # (UnsupportedDecoder, saying what differs).
        self._decoder = native_decoder(parts.decoder)
        self.decoder_stack = SonarDecoderStack(self._decoder)
        self._prefixes: dict[str, list[int]] = {}

    def modules(self) -> list[torch.nn.Module]:
        """The modules holding SONAR's weights (encoder, decoder)."""
        return [*self.text_encoder.modules(), self._decoder]

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
        backend: str = DEFAULT_BACKEND,
    ) -> SonarCodec:
        """Load encoder, decoder and tokenizer by asset-card name, with `backend`.

        `progress` hears one line before and after each (with the file's size); a card that is
        unknown, a file that is missing or cannot be downloaded raises SonarAssetError (one
        line saying what was wanted and how to provide it).
        """
        if backend not in BACKENDS:
            raise ValueError(f"sonar_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        names = (encoder, decoder, tokenizer)
        say = progress or (lambda _msg: None)
        if backend == "fairseq2":
            from models.sonar.fairseq2_backend import load_fairseq2 as load_parts
        else:
            from models.sonar.native import load_native as load_parts
        parts = load_parts(names, device=dev, dtype=dtype, asset_dirs=asset_dirs, say=say)
        return cls(parts, device=dev, dtype=dtype, names=names, backend=backend)

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
        return self.text_encoder.encode(list(texts), lang).float()

    # ----- decode ------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        embeddings: Tensor,
        lang: str | Sequence[str],
        options: DecodeOptions | Sequence[DecodeOptions] = DecodeOptions(),
        *,
        use_fairseq2: bool = False,
        decide_on_host: bool | None = None,
    ) -> list[Decoded]:
        """Decode each row, all in one batched decode (`models.decode_batch`): beam-search rows
        and sampled rows alike (a seeded row draws from its own stream, so it gives the same
        text whatever else is in the batch). With `use_fairseq2`, fairseq2's generators decode
        instead (the reference): one call per language and beam setting, sampled rows one at a
        time under their own seed. `decide_on_host`: see `DecodeBatch`."""
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
            batch = self.new_batch(self.pool_for(requests), decide_on_host=decide_on_host)
            for i, seq in zip(beam_rows, decode_all(batch, requests), strict=True):
                out[i] = self.to_decoded(seq)
        for rows in groups.values():
            results = self._run(embeddings[rows], langs[rows[0]], opts[rows[0]])
            for i, r in zip(rows, results, strict=True):
                out[i] = r
        return [d for d in out if d is not None]

    # ----- batched beam search (models.decode_batch) ----------------------------------------
    def new_batch(
        self, pool: BlockManager, owner: str = "decoder", decide_on_host: bool | None = None
    ) -> DecodeBatch:
        """An empty persistent decode batch over this codec's decoder, its cache in `pool`'s
        pages tagged `owner`."""
        return DecodeBatch(
            self.decoder_stack, self.eos_idx, self.pad_idx, pool, owner, decide_on_host
        )

    def pool_for(self, requests: Sequence[BeamRequest]) -> BlockManager:
        """A block manager of exactly the pages `requests` hold at worst, all decoding at once."""
        position = self.decoder_stack.bytes_per_position()
        page = page_bytes_for([position])
        pages = sum(beam_pages(r.beam_size, r.max_seq_len, page // position) for r in requests)
        return BlockManager(max(pages, 1), page, self.device)

    def beam_request(
        self, key: Hashable, embedding: Tensor, lang: str, o: DecodeOptions
    ) -> BeamRequest:
        """What `DecodeBatch.add` needs to decode `embedding` the way fairseq2 would."""
        prefix = self._prefixes.get(lang)
        if prefix is None:
            self.check_lang(lang)
            prefix = self._prefixes[lang] = self.tokenizer.target_prefix(lang)
        # fairseq2's bound: max_seq_len, the decoder's own limit, and prefix + 1 × source length
        # + 128 (the source being the embedding, `embed_dim` long as the reference lays it out).
        max_seq_len = min(
            o.max_tokens,
            self.decoder_stack.max_positions,
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
        return Decoded(
            text=self.tokenizer.decode(seq.tokens), num_tokens=len(seq.tokens), score=seq.score
        )

    def _run(self, embeddings: Tensor, lang: str, o: DecodeOptions) -> list[Decoded]:
        """fairseq2's generators, with the reference's arguments (`max_seq_len=256`)."""
        if self.reference is None:
            raise RuntimeError("fairseq2's generators need the fairseq2 SONAR backend")
        rows = self.reference.run(
            embeddings,
            lang,
            beam_size=o.beam_size,
            max_seq_len=o.max_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
        )
        return [Decoded(text=t, num_tokens=n, score=score) for t, n, score in rows]


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
