"""SONAR's NLLB tokenizer on the `sentencepiece` package, id for id as fairseq2's `NllbTokenizer`.

fairseq2 loads the NLLB SentencePiece model and edits it before use: it appends one CONTROL
piece `__{lang}__` per language of the card (in the card's order), then `<MINED_DATA>`,
`<MMT_BT_DATA>` and `<SMT_BT_DATA>`, and inserts a CONTROL `<pad>` at index 0 (so every id of
the file shifts by one: pad 0, unk 1, bos 2, eos 3). The same edit is made here on the model's
protobuf bytes: a protobuf message may hold a repeated field's elements anywhere, in order, so
the new pieces are serialized and written before (`<pad>`) and after (the rest) the file's own
bytes; no protobuf library is needed.

Source sequences are `[__lang__] pieces [</s>]`, target sequences `[</s>, __lang__] pieces
[</s>]` (the decoder is primed with `[</s>, __lang__]`). Control ids decode to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from torch import Tensor

DATA_SYMBOLS = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")
PAD_PIECE = "<pad>"
_CONTROL = 3  # ModelProto.SentencePiece.Type.CONTROL


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _control_piece(piece: str) -> bytes:
    """`ModelProto.pieces` entry (field 1) holding a CONTROL piece with score 0."""
    text = piece.encode("utf-8")
    msg = b"\x0a" + _varint(len(text)) + text + b"\x18" + _varint(_CONTROL)
    return b"\x0a" + _varint(len(msg)) + msg


def nllb_model_bytes(model: bytes, langs: Sequence[str]) -> bytes:
    """The SentencePiece model as fairseq2's nllb loader leaves it (see the module docstring)."""
    added = [f"__{lang}__" for lang in langs] + list(DATA_SYMBOLS)
    return _control_piece(PAD_PIECE) + model + b"".join(_control_piece(p) for p in added)


class NllbTokenizer:
    """Source/target token ids and text for SONAR's encoder and decoder."""

    def __init__(self, model: bytes, langs: Sequence[str], default_lang: str) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=nllb_model_bytes(model, langs))
        self.lang_order = list(langs)
        self.langs = frozenset(langs)
        self.default_lang = default_lang
        self.vocab_size = int(self._sp.get_piece_size())
        self.pad_idx = int(self._sp.piece_to_id(PAD_PIECE))
        self.unk_idx = int(self._sp.unk_id())
        self.bos_idx = int(self._sp.bos_id())
        self.eos_idx = int(self._sp.eos_id())
        self._lang_ids = {lang: int(self._sp.piece_to_id(f"__{lang}__")) for lang in langs}
        if self.pad_idx != 0:
            raise ValueError("the SentencePiece model already has a <pad> piece")

    @classmethod
    def load(cls, path: Path | str, langs: Sequence[str], default_lang: str) -> NllbTokenizer:
        return cls(Path(path).read_bytes(), langs, default_lang)

    def check_lang(self, lang: str) -> None:
        if lang not in self.langs:
            raise ValueError(f"`lang` must be a supported language, but is {lang} instead.")

    def lang_idx(self, lang: str) -> int:
        self.check_lang(lang)
        return self._lang_ids[lang]

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """The text's own pieces, no language or end symbols."""
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def source_ids(self, texts: Sequence[str], lang: str) -> list[list[int]]:
        """`[__lang__] pieces [</s>]`: what the encoder reads."""
        lang_id = self.lang_idx(lang)
        return [[lang_id, *ids, self.eos_idx] for ids in self.pieces(texts)]

    def target_prefix(self, lang: str) -> list[int]:
        """`[</s>, __lang__]`: what the decoder is primed with."""
        return [self.eos_idx, self.lang_idx(lang)]

    def target_ids(self, texts: Sequence[str], lang: str) -> list[list[int]]:
        prefix = self.target_prefix(lang)
        return [[*prefix, *ids, self.eos_idx] for ids in self.pieces(texts)]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of `ids`; control symbols (language, `</s>`, `<pad>`) decode to nothing."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return str(self._sp.decode([int(i) for i in ids]))

    def batch(
        self, texts: Sequence[str], lang: str, max_seq_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Source ids padded with `pad_idx` [N, T] and their lengths [N], each sequence cut to
        `max_seq_len` as sonar-space's pipeline cuts it (which can drop the final `</s>`)."""
        seqs = self.source_ids(texts, lang)
        if max_seq_len is not None:
            seqs = [s[:max_seq_len] for s in seqs]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        out = torch.full((len(seqs), int(lengths.max()) if seqs else 0), self.pad_idx)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out, lengths
