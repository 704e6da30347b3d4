"""The plain-PyTorch SONAR text decoder loads the released layout and computes as fairseq2 does."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from models import tiny
from models.pipeline import SonarLLMPipeline
from models.sonar.decoder import SonarTextDecoder, UnsupportedDecoder, native_decoder


def fairseq2_logits(decoder: Any, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """fairseq2's own modules, whole sequences (no incremental state)."""
    from fairseq2.nn import BatchLayout

    mem = memory.unsqueeze(1)
    out = decoder.decode(  # type: ignore[operator]
        tokens, BatchLayout.of(tokens), mem, BatchLayout.of(mem)
    )
    return decoder.project(out)  # type: ignore[operator]


def greedy(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    memory: torch.Tensor,
    prefix: list[int],
    eos: int,
    pad: int,
    cap: int,
) -> list[list[int]]:
    """Greedy decoding as fairseq2's generators decide it: PAD never, EOS forced at the cap."""
    out = []
    for i in range(memory.shape[0]):
        seq = list(prefix)
        while seq[-1] != eos or len(seq) == len(prefix):
            if len(seq) == cap - 1:
                seq.append(eos)
                break
            logits = logits_of(torch.tensor([seq]), memory[i : i + 1])[0, -1]
            logits[pad] = -torch.inf
            seq.append(int(logits.argmax()))
        out.append(seq)
    return out


def test_state_dict_keys_are_the_released_checkpoints(bundle: tiny.Bundle) -> None:
    state = torch.load(bundle.asset_dir / "decoder.pt", weights_only=True)["model"]
    sizes = tiny.PRESETS["tiny"]
    with torch.device("meta"):
        native = SonarTextDecoder(
            model_dim=sizes.sonar_dim,
            num_layers=sizes.sonar_layers,
            num_heads=sizes.sonar_heads,
            ffn_inner_dim=sizes.sonar_ffn,
            vocab_size=state["decoder_frontend.embed.weight"].shape[0],
            pad_idx=0,
            max_seq_len=512,
        )
    assert list(native.state_dict()) == list(state)
    native.load_state_dict(state, assign=True)
    # One tensor for the tied output projection, as in the file.
    assert native.final_proj.weight is native.decoder_frontend.embed.weight
    assert not any(t.is_meta for t in native.state_dict().values())


def test_logits_and_greedy_ids_equal_fairseq2s_decoder(pipe: SonarLLMPipeline) -> None:
    codec = pipe.codec
    theirs: Any = codec._decoder_model.decoder
    ours = native_decoder(theirs)
    # The same tensors, not copies.
    assert ours.embed_weight.data_ptr() == theirs.decoder_frontend.embed.weight.data_ptr()
    texts = tiny._corpus(random.Random(5), 12)[:12]
    memory = codec.encode(texts, "eng_Latn")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ours.vocab_size, (12, 30), generator=g)
    with torch.inference_mode():
        want = fairseq2_logits(theirs, tokens, memory)
        got = ours(tokens, memory)
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        prefix = codec.beam_request(0, memory[0], "eng_Latn", _opts()).prefix
        assert codec.pad_idx is not None
        args = (memory, list(prefix), codec.eos_idx, codec.pad_idx, 40)
        ids = greedy(ours, *args)
        assert ids == greedy(lambda t, m: fairseq2_logits(theirs, t, m), *args)
    assert len({len(s) for s in ids}) > 1  # some end early, some at the cap


def test_other_architectures_are_refused_by_name(pipe: SonarLLMPipeline) -> None:
    from fairseq2.models.transformer import TransformerNormOrder

    decoder: Any = copy.deepcopy(pipe.codec._decoder_model.decoder)
    decoder.decoder.layers[0].norm_order = TransformerNormOrder.POST
    with pytest.raises(UnsupportedDecoder, match="pre-norm"):
        native_decoder(decoder)
    decoder = copy.deepcopy(pipe.codec._decoder_model.decoder)
    decoder.decoder.layers[1].ffn.inner_activation = torch.nn.GELU()
    with pytest.raises(UnsupportedDecoder, match="ReLU"):
        native_decoder(decoder)


def _opts() -> Any:
    from models.sonar_codec import DecodeOptions

    return DecodeOptions()
