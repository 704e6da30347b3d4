"""The SONAR text decoder in plain PyTorch, under the released checkpoint's (fairseq2's) names.

Every SONAR text decoder architecture (`basic`, `small`, `toy`) is one layout: token embedding
× √model_dim plus fixed sinusoidal positions, pre-norm layers of causal self-attention,
cross-attention over the sentence embedding (a 1-token memory) and a ReLU feed-forward network,
a final LayerNorm and an output projection tied to the embedding. `state_dict()` has exactly the
keys of the released `sonar_text_decoder.pt` (under its "model" key), so the file loads as is;
the position table is computed, never stored.

Token i of a sequence sits at sinusoidal step `pad_idx + 1 + i`, where `pad_idx` is the model
config's pad index (fairseq's legacy offset; 1 for the released models, whose tokenizer pads with
0). `SonarDecoderStack` (models.decoder_stack) runs these weights one token per row over a paged
cache; `forward` here runs whole sequences (the reference the stack is checked against).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LAYER_NORM_EPS = 1e-5  # fairseq2's StandardLayerNorm default, which SONAR uses


def sinusoidal_table(
    num_positions: int, dim: int, pad_idx: int, device: torch.device | str | None = None
) -> Tensor:
    """[num_positions + 1, dim] fp32: row 0 zeros (padding), row 1 + i the encoding of step
    `pad_idx + 1 + i` as `[sin | cos]` halves with frequencies exp(k · −ln 10000 / (dim/2 − 1)),
    computed in fairseq2's order of operations so the values are bit-identical."""
    if dim % 2:
        raise ValueError(f"the model dimension must be even, got {dim}")
    half = dim // 2
    table = torch.zeros((num_positions + 1, dim), dtype=torch.float32, device=device)
    steps = torch.arange(
        pad_idx + 1, pad_idx + 1 + num_positions, dtype=torch.float32, device=device
    )
    k = torch.arange(half, dtype=torch.float32, device=device)
    freqs = torch.exp(k * -math.log(10000.0) / (half - 1))
    angles = torch.outer(steps, freqs)
    table[1:, :half] = angles.sin()
    table[1:, half:] = angles.cos()
    return table


class Attention(nn.Module):
    """Multi-head attention's projections (fairseq2's `StandardMultiheadAttention` names)."""

    def __init__(self, model_dim: int, num_heads: int) -> None:
        super().__init__()
        if model_dim % num_heads:
            raise ValueError(f"model_dim {model_dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = model_dim // num_heads
        self.q_proj = nn.Linear(model_dim, model_dim)
        self.k_proj = nn.Linear(model_dim, model_dim)
        self.v_proj = nn.Linear(model_dim, model_dim)
        self.output_proj = nn.Linear(model_dim, model_dim)


class FeedForward(nn.Module):
    def __init__(self, model_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.inner_proj = nn.Linear(model_dim, inner_dim)
        self.output_proj = nn.Linear(inner_dim, model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_proj(F.relu(self.inner_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, ffn_inner_dim: int) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(model_dim, eps=LAYER_NORM_EPS)
        self.self_attn = Attention(model_dim, num_heads)
        # Only the queries read this norm, and over a 1-token memory they change nothing (the
        # attention weight is exactly 1): kept because the checkpoint has it.
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(model_dim, eps=LAYER_NORM_EPS)
        self.encoder_decoder_attn = Attention(model_dim, num_heads)
        self.ffn_layer_norm = nn.LayerNorm(model_dim, eps=LAYER_NORM_EPS)
        self.ffn = FeedForward(model_dim, ffn_inner_dim)


class _Frontend(nn.Module):
    def __init__(self, vocab_size: int, model_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, model_dim)


class _Layers(nn.Module):
    def __init__(self, layers: Iterable[DecoderLayer], model_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(model_dim, eps=LAYER_NORM_EPS)


class _TiedProjection(nn.Module):
    """The output projection: the token embedding's own weight (one tensor, two keys)."""

    weight: Tensor

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight  # a Parameter: registered as this module's

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class SonarTextDecoder(nn.Module):
    """The SONAR text decoder; see the module docstring."""

    def __init__(
        self,
        *,
        model_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_inner_dim: int,
        vocab_size: int,
        pad_idx: int,
        max_seq_len: int,
    ) -> None:
        super().__init__()
        self.model_dim = model_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ffn_inner_dim = ffn_inner_dim
        self.vocab_size = vocab_size
        self.pad_idx = pad_idx
        self.max_seq_len = max_seq_len  # positions the table has: the longest sequence
        self.scale = math.sqrt(model_dim)
        self.decoder_frontend = _Frontend(vocab_size, model_dim)
        self.decoder = _Layers(
            (DecoderLayer(model_dim, num_heads, ffn_inner_dim) for _ in range(num_layers)),
            model_dim,
        )
        self.final_proj = _TiedProjection(self.decoder_frontend.embed.weight)
        self._tables: dict[torch.device, Tensor] = {}
        self.register_load_state_dict_post_hook(_retie)

    def config(self) -> dict[str, int]:
        """The constructor's keywords, to build another one like it."""
        return {
            "model_dim": self.model_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "ffn_inner_dim": self.ffn_inner_dim,
            "vocab_size": self.vocab_size,
            "pad_idx": self.pad_idx,
            "max_seq_len": self.max_seq_len,
        }

    # ----- pieces the paged stack reads ------------------------------------------------------
    @property
    def embed_weight(self) -> Tensor:
        return self.decoder_frontend.embed.weight

    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.decoder.layers)  # type: ignore[arg-type]

    def position_table(self, device: torch.device) -> Tensor:
        """The fp32 sinusoidal table on `device` (row p + 1 is position p), made once."""
        table = self._tables.get(device)
        if table is None:
            table = sinusoidal_table(self.max_seq_len, self.model_dim, self.pad_idx, device)
            self._tables[device] = table
        return table

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings × √model_dim plus their positions' encodings (added in fp32, as
        fairseq2 adds them), in the weights' dtype; `positions` as `tokens`, 0-based."""
        x = self.decoder_frontend.embed(tokens) * self.scale
        freqs = self.position_table(tokens.device)[positions + 1]
        return (x.float() + freqs).type_as(x)

    def cross_attention(self, memory: Tensor) -> Tensor:
        """[N, E] sentence embeddings → [N, layers, model_dim]: each layer's cross-attention
        output. Attention over a single key weighs it exactly 1, so the output is
        `output_proj(v_proj(memory))`, whatever the queries."""
        mem = memory.to(self.embed_weight.dtype)
        return torch.stack(
            [
                m.encoder_decoder_attn.output_proj(m.encoder_decoder_attn.v_proj(mem))
                for m in self.layers
            ],
            dim=1,
        )

    def forward(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """Logits [N, S, V] for the next token after each position of `tokens` [N, S], every
        row attending causally to itself and to its sentence embedding `memory` [N, E]."""
        n, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(n, s)
        x = self.embed(tokens, positions)
        cross = self.cross_attention(memory)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(x)
            q, k, v = (
                p(h).view(n, s, attn.num_heads, attn.head_dim).transpose(1, 2)
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = attn.output_proj(out.transpose(1, 2).flatten(-2, -1)) + x
            x = cross[:, i : i + 1] + x
            x = layer.ffn(layer.ffn_layer_norm(x)) + x
        return self.final_proj(self.decoder.layer_norm(x))

    # ----- random weights (demo bundles) -----------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fairseq2's initialisation of these modules, drawn in the order its factory builds
        them (layer by layer: self-attention, cross-attention, feed-forward; then the
        embedding), so that under one seed it gives the same weights: attention q/k/v
        Xavier-uniform with gain 1/√2 and output Xavier-uniform, biases zero; feed-forward
        layers PyTorch's default; layer norms ones and zeros; embedding N(0, 1/model_dim) with
        the pad row zero."""
        for layer in self.layers:
            for attn in (layer.self_attn, layer.encoder_decoder_attn):
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)
                    nn.init.zeros_(proj.bias)
                nn.init.xavier_uniform_(attn.output_proj.weight)
                nn.init.zeros_(attn.output_proj.bias)
            layer.ffn.inner_proj.reset_parameters()
            layer.ffn.output_proj.reset_parameters()
            for norm in (
                layer.self_attn_layer_norm,
                layer.encoder_decoder_attn_layer_norm,
                layer.ffn_layer_norm,
            ):
                norm.reset_parameters()
        self.decoder.layer_norm.reset_parameters()
        embed = self.embed_weight
        nn.init.normal_(embed, std=self.model_dim**-0.5)
        embed[self.pad_idx].fill_(0.0)

    def tie(self) -> None:
        """Make the output projection the embedding's weight again (after a conversion that
        gave the two keys a tensor each)."""
        self.final_proj.weight = self.decoder_frontend.embed.weight


def _retie(module: nn.Module, _incompatible: Any) -> None:
    """After `load_state_dict(assign=True)` the two keys of the tied projection are two
    parameters; one stored tensor (the released files store it once) is one parameter again,
    so that a later `.to(dtype)` does not make two copies of the 256k-row matrix."""
    assert isinstance(module, SonarTextDecoder)
    embed = module.decoder_frontend.embed.weight
    proj = module.final_proj.weight
    if proj is not embed and proj.data_ptr() == embed.data_ptr() and proj.shape == embed.shape:
        module.tie()


class UnsupportedDecoder(ValueError):
    """A decoder module that is not the SONAR text decoder architecture."""


def native_decoder(module: nn.Module) -> SonarTextDecoder:
    """`module` if it is a `SonarTextDecoder`; a fairseq2 SONAR text decoder's tensors (shared,
    not copied) in a `SonarTextDecoder`; else UnsupportedDecoder, saying what differs. Reads
    fairseq2's modules by their attributes only (nothing from fairseq2 is imported)."""
    if isinstance(module, SonarTextDecoder):
        return module
    m: Any = module

    def need(cond: object, what: str) -> None:
        if not cond:
            raise UnsupportedDecoder(f"not a SONAR text decoder: {what}")

    fe: Any = getattr(m, "decoder_frontend", None)
    need(fe is not None and hasattr(fe, "embed"), "no embedding frontend")
    need(getattr(fe, "layer_norm", None) is None, "frontend layer norm")
    pos: Any = getattr(fe, "pos_encoder", None)
    need(type(pos).__name__ == "SinusoidalPositionEncoder", "positions are not sinusoidal")
    layers = list(getattr(getattr(m, "decoder", None), "layers", []))
    need(layers, "no decoder layers")
    dim = int(fe.embed.weight.shape[1])
    need(math.isclose(float(fe.scale), math.sqrt(dim)), "embeddings not scaled by √model_dim")
    for layer in layers:
        need(getattr(layer.norm_order, "name", "") == "PRE", "norm order is not pre-norm")
        need(isinstance(layer.ffn.inner_activation, nn.ReLU), "the feed-forward is not ReLU")
        need(getattr(layer.ffn, "inner_layer_norm", None) is None, "feed-forward layer norm")
        for name in ("self_attn", "encoder_decoder_attn"):
            attn = getattr(layer, name)
            need(attn.num_key_value_heads == attn.num_heads, f"{name}: grouped-query attention")
            need(
                attn.q_norm is None and attn.k_norm is None and attn.pos_encoder is None,
                f"{name}: q/k norms or rotary positions",
            )
            need(getattr(attn.sdpa, "scale", None) is None, f"{name}: attention scale")
        bias = type(layer.self_attn.sdpa.bias).__name__
        need(bias == "CausalAttentionBias", "self-attention is not causal")
        need(getattr(layer.self_attn.sdpa.bias, "attn_window_len", None) is None, "sliding window")
    need(getattr(m.decoder, "layer_norm", None) is not None, "no final layer norm")
    need(getattr(m, "post_sentemb_proj", None) is None, "a projection of the embedding")
    need(m.final_proj.weight is fe.embed.weight, "the output projection is not tied")
    with torch.device("meta"):  # no memory until the tensors are handed over
        native = SonarTextDecoder(
            model_dim=dim,
            num_layers=len(layers),
            num_heads=int(layers[0].self_attn.num_heads),
            ffn_inner_dim=int(layers[0].ffn.inner_proj.weight.shape[0]),
            vocab_size=int(fe.embed.weight.shape[0]),
            pad_idx=int(pos.sin_offset) - 1,
            max_seq_len=int(pos.max_seq_len),
        )
    try:
        native.load_state_dict(module.state_dict(), assign=True)
    except RuntimeError as e:
        raise UnsupportedDecoder(f"not a SONAR text decoder: {e}") from e
    return native.eval()
