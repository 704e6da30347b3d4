"""The built-in demo bundle: every component, with random weights, in the released formats.

`sonar-llm tiny DIR` (and the test suite) writes:

    DIR/sonar/tokenizer.model      SentencePiece model (NLLB-style: language control symbols)
    DIR/sonar/encoder.pt           SONAR text encoder, fairseq2 checkpoint ({"model": state})
    DIR/sonar/decoder.pt           SONAR text decoder, same format
    DIR/sonar/cards.yaml           fairseq2 asset cards naming the three
    DIR/sonar-llm/config.json      SONAR-LLM in the released Hugging Face layout
    DIR/sonar-llm/pytorch_model.bin  (incl. the `sonar_decoder.*` keys training leaves behind)
    DIR/bundle.json                what to pass where

Its text is gibberish: the point is that the real loading code runs end to end offline.
The "small" preset (benchmarks) writes the same files with wider SONAR parts and the released
100M SONAR-LLM layout, under its own card names so both bundles load in one process.

The "full" preset (benchmarks and memory tests at the released sizes) writes SONAR's `basic`
encoder and decoder unshrunk (1024-d, 24 layers each, 16 heads, FFN 8192, 256,206 tokens; 3.0 +
3.5 GB), a 256,206-entry tokenizer written directly as a SentencePiece `ModelProto` (none can be
trained that large from a small corpus, see `write_sentencepiece_model`) and the SONAR-LLM at one
of the released size configs (`llm="100m"`, "300m", "600m" or "900m"). It leaves out the
`sonar_decoder.*` keys (another 3.5 GB that loading only counts and skips): bundle.json says so.
Its decoder gets the same shaping as "small" (cross-attention ×4, EOS row ×15): texts depend on
the input, but lengths are bimodal (encoded sentences mostly end after one piece, random
embeddings mostly run to the token bound), so cap `max_tokens` when benchmarking.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from models.config import SonarLLMConfig
from models.sonar.decoder import SonarTextDecoder
from models.sonar_codec import sonar_languages

BUNDLE_FILE = "bundle.json"
ENCODER_CARD = "sonar_llm_tiny_encoder"
DECODER_CARD = "sonar_llm_tiny_decoder"
TINY_DIM = 64
SMALL_DIM = 256
SONAR_DIM = 1024  # SONAR's real embedding width
DECODER_MAX_SEQ_LEN = 512  # SONAR's decoder architectures' position table (arch `basic`)

TINY_LLM = SonarLLMConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=24,  # heads × head_dim ≠ hidden, as in the released 600M/900M configs
    vocab_size=256,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    embed_dim=TINY_DIM,
)

# The released 100M layout (SonarLLM_100M.json), reading SMALL_DIM-d embeddings.
SMALL_LLM = SonarLLMConfig(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=32,
    vocab_size=128256,
    rope_scaling=TINY_LLM.rope_scaling,
    embed_dim=SMALL_DIM,
)


def _released_llm(hidden: int, layers: int, heads: int, head_dim: int, ffn: int) -> SonarLLMConfig:
    """One of the released `SonarLLM_*.json` size configs (SONAR's 1024-d embeddings)."""
    return SonarLLMConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        vocab_size=128256,
        rope_scaling=TINY_LLM.rope_scaling,
        embed_dim=SONAR_DIM,
    )


# The released SONAR-LLM sizes (facts: SonarLLM_{100M,300M,600M,900M}.json), for the full preset.
RELEASED_LLMS: dict[str, SonarLLMConfig] = {
    "100m": _released_llm(512, 8, 16, 32, 2048),
    "300m": _released_llm(1024, 10, 16, 64, 4096),
    "600m": _released_llm(1280, 16, 26, 64, 5120),
    "900m": _released_llm(1536, 17, 32, 64, 6144),
}
# The released SONAR tokenizer's size as fairseq2 reports it: 256,000 SentencePiece pieces plus
# the nllb loader's language symbols, three data-tag symbols and <pad>.
FULL_VOCAB = 256206


@dataclass(frozen=True)
class Preset:
    """Sizes of one bundle: the SONAR encoder/decoder (same shape) and the SONAR-LLM."""

    name: str
    sonar_dim: int
    sonar_layers: int
    sonar_heads: int
    sonar_ffn: int
    llm: SonarLLMConfig
    encoder_card: str
    decoder_card: str
    cross_attn_gain: float = 2.0  # see _shape_decoder; wider random decoders need more
    eos_gain: float = 5.0
    # None: a small tokenizer trained on `_corpus`; else the tokenizer's vocab_info size, written
    # directly as a ModelProto (`write_sentencepiece_model`).
    vocab_size: int | None = None
    # Whether the SONAR-LLM checkpoint also carries the decoder as `sonar_decoder.*` (as released
    # training-time checkpoints do).
    sonar_decoder_keys: bool = True


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", TINY_DIM, 2, 4, 128, TINY_LLM, ENCODER_CARD, DECODER_CARD),
    # A CPU can still run it: benchmarks use it as the larger model.
    "small": Preset(
        "small",
        SMALL_DIM,
        4,
        8,
        1024,
        SMALL_LLM,
        "sonar_llm_small_encoder",
        "sonar_llm_small_decoder",
        cross_attn_gain=4.0,
        eos_gain=15.0,
    ),
    # SONAR's `basic` encoder and decoder at their real sizes; the SONAR-LLM is chosen by `llm`.
    "full": Preset(
        "full",
        SONAR_DIM,
        24,
        16,
        8192,
        RELEASED_LLMS["100m"],
        "sonar_llm_full_encoder",
        "sonar_llm_full_decoder",
        cross_attn_gain=4.0,
        eos_gain=15.0,
        vocab_size=FULL_VOCAB,
        sonar_decoder_keys=False,
    ),
}


def preset_sizes(preset: str, llm: str | None = None) -> Preset:
    """The named preset; `llm` (full preset only) picks a released SONAR-LLM size."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    sizes = PRESETS[preset]
    if llm is None:
        return sizes
    if preset != "full":
        raise ValueError(f"--llm only applies to the full preset, not {preset!r}")
    if llm not in RELEASED_LLMS:
        raise ValueError(f"llm must be one of {', '.join(RELEASED_LLMS)}, got {llm!r}")
    return replace(sizes, llm=RELEASED_LLMS[llm])


_WORDS = (
    "the a one small big old new red blue green quick lazy happy sad bright dark little "
    "cat dog fox bird tree river house garden city road sun moon star girl boy mother father "
    "friend teacher doctor story book song game day night morning evening week year time "
    "runs jumps sees finds likes wants makes takes gives walks plays reads writes sings opens "
    "was is were are had has will can could would should did does went came saw found made "
    "and but so then because when after before while with without under over near far "
    "very really always never often sometimes today yesterday tomorrow here there again "
    "begin end of text sequence summary summarization sentence only in two three"
).split()


@dataclass(frozen=True)
class Bundle:
    """Where a bundle's parts are; what the loaders need."""

    root: Path
    model: Path
    asset_dir: Path
    encoder: str = ENCODER_CARD
    decoder: str = DECODER_CARD
    tokenizer: str = ENCODER_CARD

    @classmethod
    def open(cls, root: Path | str) -> Bundle:
        root = Path(root)
        meta = json.loads((root / BUNDLE_FILE).read_text())
        return cls(
            root=root,
            model=root / meta["model"],
            asset_dir=root / meta["asset_dir"],
            encoder=meta["encoder"],
            decoder=meta["decoder"],
            tokenizer=meta["tokenizer"],
        )


def is_bundle(root: Path | str) -> bool:
    return (Path(root) / BUNDLE_FILE).is_file()


def _corpus(rng: random.Random, n: int = 600) -> list[str]:
    lines = []
    for _ in range(n):
        words = rng.choices(_WORDS, k=rng.randint(4, 12))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"]))
    return [*lines, "End of sequence.", "Begin of text.", "Dr. Smith arrived at 5 p.m."]


def _sonar_langs() -> list[str]:
    return sorted(sonar_languages())


def nllb_added_symbols(num_langs: int) -> int:
    """How many entries fairseq2's nllb loader adds to a SentencePiece model: one `__lang__` per
    language, `<MINED_DATA>`, `<MMT_BT_DATA>`, `<SMT_BT_DATA>` and `<pad>`."""
    return num_langs + 4


_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v",
    "w", "y", "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "ph", "pl", "pr",
    "sc", "sh", "sk", "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "wh", "wr",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "y", "ai", "au", "ea", "ee", "ei", "ie", "oa", "oi", "oo", "ou")
_CODAS = (
    "", "b", "d", "g", "k", "l", "m", "n", "p", "r", "s", "t", "x", "ck", "ct", "ft", "ld",
    "ll", "lt", "mp", "nd", "ng", "nk", "nt", "rd", "rk", "rm", "rn", "rt", "sh", "ss", "st", "th",
)  # fmt: skip
_AFFIXES = (
    "s", "es", "ed", "ing", "er", "ers", "est", "ly", "ion", "ions", "tion", "ation", "ment",
    "ness", "able", "ible", "al", "ial", "ous", "ive", "ity", "ize", "ise", "ful", "less", "ship",
    "re", "un", "in", "im", "dis", "pre", "pro", "con", "com", "de", "ex", "en", "over", "under",
)  # fmt: skip


def write_sentencepiece_model(path: Path | str, num_pieces: int, *, seed: int = 0) -> None:
    """Write an NLLB-style unigram SentencePiece model of exactly `num_pieces` pieces to `path`.

    Built piece by piece as a `ModelProto`, no training: `<unk>` `<s>` `</s>` (ids 0-2, as the
    trained tiny tokenizer has them), the 256 byte pieces (byte fallback: any text encodes),
    printable ASCII and Latin-1 letters with and without the word-start mark, `_WORDS`, common
    affixes, then made-up syllable strings up to the size. Every piece is NORMAL, BYTE or a
    special, so every id decodes; the language symbols come from fairseq2's nllb loader, which
    adds `nllb_added_symbols(len(langs))` entries.
    """
    from sentencepiece import sentencepiece_model_pb2

    pb: Any = sentencepiece_model_pb2  # generated protobuf code: no type stubs

    chars = [chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0xC0, 0x180)]
    least = 3 + 256 + 1 + 2 * len(chars)
    if num_pieces < least:
        raise ValueError(f"a model needs at least {least} pieces, got {num_pieces}")
    rng = random.Random(seed)
    proto = pb.ModelProto()
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.vocab_size = num_pieces
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = True
    norm.escape_whitespaces = True

    kind = pb.ModelProto.SentencePiece
    seen: set[str] = set()

    def add(piece: str, score: float, type_: int = kind.NORMAL) -> None:
        if piece and piece not in seen and len(proto.pieces) < num_pieces:
            seen.add(piece)
            proto.pieces.add(piece=piece, score=score, type=type_)

    for special, type_ in (("<unk>", kind.UNKNOWN), ("<s>", kind.CONTROL), ("</s>", kind.CONTROL)):
        add(special, 0.0, type_)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, kind.BYTE)
    # Single characters cost most, so the segmentation prefers longer pieces.
    add("\u2581", -12.0)
    for ch in chars:
        add("\u2581" + ch, -11.0)
        add(ch, -11.5)
    words = sorted(set(_WORDS))
    for w in words:
        for form in (w, w.capitalize()):
            add("\u2581" + form, -6.0 - 0.01 * rng.random())
            add(form, -8.0 - 0.01 * rng.random())
    for a in _AFFIXES:
        add(a, -7.0 - 0.01 * rng.random())
        add("\u2581" + a, -7.5 - 0.01 * rng.random())
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    if len(proto.pieces) < num_pieces:
        for s in syllables:
            add("\u2581" + s, -9.0 - rng.random())
            add(s, -9.5 - rng.random())
    while len(proto.pieces) < num_pieces:
        s = rng.choice(syllables) + rng.choice(syllables)
        if rng.random() < 0.5:
            s = "\u2581" + s
        add(s if rng.random() < 0.9 else s.capitalize(), -10.0 - rng.random())
    Path(path).write_bytes(proto.SerializeToString())


def _shape_decoder(
    decoder: SonarTextDecoder,
    vocab: NllbVocab,
    cross_attn_gain: float = 2.0,
    eos_gain: float = 5.0,
) -> None:
    """Tilt the random decoder so its sentences depend on the embedding and end at varied lengths.

    Untrained, it ignores its 1-token memory, emits language control tokens (which detokenize to
    nothing) and never ends a sentence. Stronger cross-attention, damped control-token rows and a
    larger EOS row (the output projection is tied to the embedding) fix that, still randomly.
    """
    control = [*vocab.lang_ids, vocab.pad_idx, vocab.unk_idx, vocab.bos_idx]
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if (
                "encoder_decoder_attn.v_proj" in name
                or "encoder_decoder_attn.output_proj.w" in name
            ):
                p.mul_(cross_attn_gain)
        embed = decoder.embed_weight
        embed[control] *= 0.1
        embed[vocab.eos_idx] *= eos_gain


@dataclass(frozen=True)
class NllbVocab:
    """The vocabulary fairseq2's nllb loader makes of a SentencePiece model: `<pad>` moved to 0
    (every piece's id + 1: unk 1, bos 2, eos 3), then `__lang__` for each language in order,
    `<MINED_DATA>`, `<MMT_BT_DATA>` and `<SMT_BT_DATA>`."""

    num_pieces: int
    langs: tuple[str, ...]
    pad_idx: int = 0
    unk_idx: int = 1
    bos_idx: int = 2
    eos_idx: int = 3

    @property
    def size(self) -> int:
        return self.num_pieces + nllb_added_symbols(len(self.langs))

    @property
    def lang_ids(self) -> list[int]:
        return [self.num_pieces + 1 + i for i in range(len(self.langs))]

    def card(self) -> dict[str, int]:
        """The `vocab_info` of a model card."""
        return {
            "size": self.size,
            "unk_idx": self.unk_idx,
            "bos_idx": self.bos_idx,
            "eos_idx": self.eos_idx,
            "pad_idx": self.pad_idx,
        }


def _write_tokenizer(path: Path, sizes: Preset, langs: list[str], seed: int) -> int:
    """The preset's SentencePiece model at `path`; returns its number of pieces."""
    import sentencepiece as spm

    if sizes.vocab_size is not None:
        num_pieces = sizes.vocab_size - nllb_added_symbols(len(langs))
        write_sentencepiece_model(path, num_pieces, seed=seed)
        return num_pieces
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(seed))),
        model_prefix=str(path.with_suffix("")),
        vocab_size=300,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    path.with_suffix(".vocab").unlink(missing_ok=True)
    return int(spm.SentencePieceProcessor(model_file=str(path)).get_piece_size())


def _encoder_state(sizes: Preset, vocab: NllbVocab) -> dict[str, torch.Tensor]:
    """A random SONAR text encoder under the released checkpoint's keys, initialised as
    fairseq2 initialises it (the decoder's scheme: `SonarTextDecoder.reset_parameters`)."""
    d, ffn = sizes.sonar_dim, sizes.sonar_ffn
    state: dict[str, torch.Tensor] = {}
    embed = torch.empty(vocab.size, d).normal_(std=d**-0.5)
    embed[vocab.pad_idx] = 0.0
    state["encoder_frontend.embed.weight"] = embed
    for i in range(sizes.sonar_layers):
        at = f"encoder.layers.{i}."
        state[at + "self_attn_layer_norm.weight"] = torch.ones(d)
        state[at + "self_attn_layer_norm.bias"] = torch.zeros(d)
        for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
            w = torch.empty(d, d)
            torch.nn.init.xavier_uniform_(w, gain=1.0 if proj == "output_proj" else 2**-0.5)
            state[at + f"self_attn.{proj}.weight"] = w
            state[at + f"self_attn.{proj}.bias"] = torch.zeros(d)
        state[at + "ffn_layer_norm.weight"] = torch.ones(d)
        state[at + "ffn_layer_norm.bias"] = torch.zeros(d)
        for name, linear in (("inner_proj", (d, ffn)), ("output_proj", (ffn, d))):
            m = torch.nn.Linear(*linear)  # PyTorch's default initialisation, as fairseq2's
            state[at + f"ffn.{name}.weight"] = m.weight.detach()
            state[at + f"ffn.{name}.bias"] = m.bias.detach()
    state["layer_norm.weight"] = torch.ones(d)
    state["layer_norm.bias"] = torch.zeros(d)
    return state


def build_sonar(sonar_dir: Path | str, *, seed: int = 0, preset: str = "tiny") -> SonarTextDecoder:
    """Write the SONAR part of a bundle (tokenizer, encoder, decoder, cards) to `sonar_dir`;
    returns the decoder. Load it with `SonarCodec.load(<preset's cards>, asset_dirs=[sonar_dir])`.
    Needs neither fairseq2 nor sonar-space: the files are written in their formats directly.
    """
    sizes = preset_sizes(preset)
    sonar_dir = Path(sonar_dir)
    sonar_dir.mkdir(parents=True, exist_ok=True)
    langs = _sonar_langs()
    num_pieces = _write_tokenizer(sonar_dir / "tokenizer.model", sizes, langs, seed)
    vocab = NllbVocab(num_pieces, tuple(langs))
    tokenizer_config = {"_set_": {"default_lang": "eng_Latn", "langs": langs}}
    overrides = {
        "model_dim": sizes.sonar_dim,
        "num_encoder_layers": sizes.sonar_layers,
        "num_decoder_layers": sizes.sonar_layers,
        "num_encoder_attn_heads": sizes.sonar_heads,
        "num_decoder_attn_heads": sizes.sonar_heads,
        "ffn_inner_dim": sizes.sonar_ffn,
        "vocab_info": vocab.card(),
    }
    cards = [
        {
            "name": card,
            "model_family": family,
            "model_arch": "basic",
            "model_config": {"_set_": overrides},
            "checkpoint": checkpoint,
            "tokenizer": "tokenizer.model",
            "tokenizer_family": "nllb",
            "tokenizer_config": tokenizer_config,
        }
        for card, family, checkpoint in (
            (sizes.encoder_card, "transformer_encoder", "encoder.pt"),
            (sizes.decoder_card, "transformer_decoder", "decoder.pt"),
        )
    ]
    (sonar_dir / "cards.yaml").write_text(yaml.safe_dump_all(cards, sort_keys=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # One model in memory at a time (the full preset's are 3.0 and 3.5 GB). The released
        # SONAR files are fairseq2 checkpoints with the state under "model".
        torch.save({"model": _encoder_state(sizes, vocab)}, sonar_dir / "encoder.pt")
        with torch.device("meta"):  # no random numbers drawn but reset_parameters' own
            decoder = SonarTextDecoder(
                model_dim=sizes.sonar_dim,
                num_layers=sizes.sonar_layers,
                num_heads=sizes.sonar_heads,
                ffn_inner_dim=sizes.sonar_ffn,
                vocab_size=vocab.size,
                pad_idx=vocab.pad_idx,  # the cards' model config sets the tokenizer's
                max_seq_len=DECODER_MAX_SEQ_LEN,
            )
        decoder.to_empty(device="cpu")
        decoder.tie()
        # fairseq2's initialisation in its order: with the encoder's draws before it, the same
        # weights as fairseq2's `create_new_model` gives under this seed.
        decoder.reset_parameters()
        _shape_decoder(decoder, vocab, sizes.cross_attn_gain, sizes.eos_gain)
        torch.save({"model": decoder.state_dict()}, sonar_dir / "decoder.pt")
    return decoder


def build(
    root: Path | str, *, seed: int = 0, preset: str = "tiny", llm: str | None = None
) -> Bundle:
    """Write a complete random-weight bundle to `root` (tiny: a few seconds on a CPU; full: a
    few minutes and ~7 GB). `llm` picks the full preset's SONAR-LLM size (default "100m")."""
    sizes = preset_sizes(preset, llm)
    from models.checkpoint import save_pretrained
    from models.sonar_llm import SonarLLM

    root = Path(root)
    llm_dir = root / "sonar-llm"
    llm_dir.mkdir(parents=True, exist_ok=True)
    decoder = build_sonar(root / "sonar", seed=seed, preset=preset)
    if not sizes.sonar_decoder_keys:
        del decoder  # before the SONAR-LLM is made: one large model in memory at a time
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = SonarLLM(sizes.llm)
    path = save_pretrained(model, llm_dir, safetensors=False)
    del model
    if sizes.sonar_decoder_keys:
        # Released training-time checkpoints still carry the frozen decoder as
        # `sonar_decoder.model.*`.
        state = torch.load(path / "pytorch_model.bin", weights_only=True)
        state.update({f"sonar_decoder.model.{k}": v for k, v in decoder.state_dict().items()})
        torch.save(state, path / "pytorch_model.bin")

    meta = {
        "description": "SONAR-LLM demo bundle with random weights: its output is gibberish",
        "model": "sonar-llm",
        "asset_dir": "sonar",
        "encoder": sizes.encoder_card,
        "decoder": sizes.decoder_card,
        "tokenizer": sizes.encoder_card,
        "seed": seed,
        "preset": preset,
        "llm": llm or ("100m" if preset == "full" else None),
        "sonar_decoder_keys": sizes.sonar_decoder_keys,
    }
    (root / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Bundle.open(root)
