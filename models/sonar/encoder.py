"""SONAR's text encoder on plain PyTorch: token ids to pooled sentence embeddings.

The arithmetic of fairseq2's `transformer_encoder` family as sonar-space builds it, with its
parameter names (so the released `sonar_text_encoder.pt` loads as it is):

- embed × √model_dim, plus sinusoidal positions: `[sin | cos]` halves, frequency
  `exp(k · −ln(10000) / (d/2 − 1))`, token i at step `pad_idx + 1 + i` (fairseq's legacy
  offset, with the model config's pad index), computed once in fp32 and added in fp32;
- pre-norm layers (LayerNorm, self-attention over the unpadded keys; LayerNorm, ReLU FFN);
- a final LayerNorm, then the mean over each sentence's own tokens (language symbol and
  `</s>` included): sum / (length + 1e-7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.sonar.decoder import sinusoidal_table

Device = torch.device | str | None


class _Linear(nn.Linear):
    def reset_parameters(self) -> None:
        # On the meta device there is nothing to initialise, and `uniform_` there would import
        # sympy (seconds) for nothing.
        if not self.weight.is_meta:
            super().reset_parameters()


class _Embed(nn.Module):
    def __init__(self, vocab_size: int, model_dim: int, device: Device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, model_dim, device=device))


class _Frontend(nn.Module):
    def __init__(self, vocab_size: int, model_dim: int, device: Device) -> None:
        super().__init__()
        self.embed = _Embed(vocab_size, model_dim, device)


class _Attention(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, device: Device) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = _Linear(model_dim, model_dim, device=device)
        self.k_proj = _Linear(model_dim, model_dim, device=device)
        self.v_proj = _Linear(model_dim, model_dim, device=device)
        self.output_proj = _Linear(model_dim, model_dim, device=device)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        n, s, d = x.shape
        shape = (n, s, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.output_proj(out.transpose(1, 2).reshape(n, s, d))


class _FeedForward(nn.Module):
    def __init__(self, model_dim: int, inner_dim: int, device: Device) -> None:
        super().__init__()
        self.inner_proj = _Linear(model_dim, inner_dim, device=device)
        self.output_proj = _Linear(inner_dim, model_dim, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_proj(F.relu(self.inner_proj(x)))


class _Layer(nn.Module):
    def __init__(self, model_dim: int, num_heads: int, ffn_inner_dim: int, device: Device) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(model_dim, eps=1e-5, device=device)
        self.self_attn = _Attention(model_dim, num_heads, device)
        self.ffn_layer_norm = nn.LayerNorm(model_dim, eps=1e-5, device=device)
        self.ffn = _FeedForward(model_dim, ffn_inner_dim, device)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.ffn(self.ffn_layer_norm(x))


class _Stack(nn.Module):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class SonarTextEncoder(nn.Module):
    """Token ids [N, S] (padded) + lengths [N] → sentence embeddings [N, model_dim]."""

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
        device: Device = None,
    ) -> None:
        """`device="meta"` builds it without memory, for `load_state_dict(assign=True)`."""
        super().__init__()
        if model_dim % num_heads:
            raise ValueError(f"model_dim {model_dim} is not a multiple of {num_heads} heads")
        self.model_dim = model_dim
        self.max_seq_len = max_seq_len
        self.pad_idx = pad_idx
        self.encoder_frontend = _Frontend(vocab_size, model_dim, device)
        self.encoder = _Stack(
            [_Layer(model_dim, num_heads, ffn_inner_dim, device) for _ in range(num_layers)]
        )
        self.layer_norm = nn.LayerNorm(model_dim, eps=1e-5, device=device)
        # Not a parameter: recomputed (in fp32, on the module's device) rather than loaded.
        self.positions: Tensor
        self.register_buffer("positions", torch.empty(0), persistent=False)

    def _positions(self, device: torch.device) -> Tensor:
        table = self.positions
        if table.numel() == 0 or table.device != device or table.dtype != torch.float32:
            table = sinusoidal_table(self.max_seq_len, self.model_dim, self.pad_idx, device)
            self.positions = table
        return table

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        n, s = tokens.shape
        if s > self.max_seq_len:
            raise ValueError(f"sequences of {s} tokens exceed the encoder's {self.max_seq_len}")
        weight = self.encoder_frontend.embed.weight
        x = F.embedding(tokens, weight) * math.sqrt(self.model_dim)
        steps = torch.arange(s, device=tokens.device)
        valid = steps[None, :] < lengths.to(tokens.device)[:, None]  # [N, S]
        table = self._positions(tokens.device)
        x = (x.float() + table[torch.where(valid, steps + 1, 0)]).type_as(x)
        mask = None
        if not bool(valid.all()):
            # Additive key-padding mask in the activations' dtype, as fairseq2 materialises it.
            mask = torch.zeros(n, 1, 1, s, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.layer_norm(x)
        x = x.where(valid[:, :, None], 0.0)
        weights = 1.0 / (lengths.to(device=x.device, dtype=x.dtype) + 1e-7)
        return x.sum(dim=1) * weights[:, None]
