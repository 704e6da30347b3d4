"""The SONAR-LLM network: a Llama stack that reads and predicts SONAR sentence embeddings.

Parameter names equal the released checkpoints' keys (`llama_model.model.*`,
`forward_proj.linear.*`, `reverse_proj.linear.*`), so loading is a strict `load_state_dict`.
The token embedding / lm_head that the released Llama carries is loaded but never computed.

Two ways to run it: `forward_hidden` recomputes a whole context (the authors' way), and
`extend` appends to a paged KV cache (`models.kv_cache`), so each new sentence costs one
position and a long prompt can be fed in chunks.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.block_manager import BlockManager, blocks_for, page_bytes_for
from models.config import SonarLLMConfig
from models.kv_cache import PagedKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the input dtype, exactly as transformers' LlamaRMSNorm.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        # Attention width (heads × head_dim) may differ from hidden_size (600M, 900M configs).
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache: _LayerCache | None
    ) -> Tensor:
        """Attend over `x` ([B, T, hidden]); with `cache`, store this call's keys and values
        there first and attend over everything the sequences hold."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is None:
            keys, values = k, v
        else:
            cache.kv.write(cache.layer, cache.slots, k.transpose(1, 2), v.transpose(1, 2))
            keys, values = cache.kv.gather(cache.layer, cache.table, cache.length)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads
        )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)


@dataclass(frozen=True)
class _LayerCache:
    """One layer's view of a paged cache during an `extend` call."""

    layer: int
    kv: PagedKVCache
    slots: tuple[Tensor, Tensor, Tensor]
    table: Tensor
    length: int


class MLP(nn.Module):
    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaBackbone(nn.Module):
    """`model.*` of transformers' LlamaForCausalLM: token embedding (unused), layers, norm."""

    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLMWeights(nn.Module):
    """Holds the released `llama_model.*` weights; its lm_head is tied and never computed."""

    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class SonarLLM(nn.Module):
    """Embeddings in, next-sentence embeddings out."""

    rope_inv_freq: Tensor

    def __init__(self, cfg: SonarLLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.llama_model = LlamaForCausalLMWeights(cfg)
        self.forward_proj = Projector(cfg.embed_dim, cfg.hidden_size)
        self.reverse_proj = Projector(cfg.hidden_size, cfg.embed_dim)
        inv_freq, scaling = _rope_inv_freq(cfg)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.rope_scaling = scaling

    # ----- helpers -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.forward_proj.linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.forward_proj.linear.weight.dtype

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin for `positions` ([B, T]) shaped [B, 1, T, head_dim], computed in fp32."""
        freqs = positions.float()[..., None] * self.rope_inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scaling).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scaling).to(dtype)[:, None]
        return cos, sin

    def _layers(
        self,
        h: Tensor,
        positions: Tensor,
        mask: Tensor,
        cache: tuple[PagedKVCache, tuple[Tensor, Tensor, Tensor], Tensor, int] | None = None,
    ) -> Tensor:
        cos, sin = self._rope(positions, h.dtype)
        layers = cast(list[DecoderLayer], self.llama_model.model.layers)
        for i, layer in enumerate(layers):
            paged = None if cache is None else _LayerCache(i, *cache)
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, mask, paged)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.llama_model.model.norm(h)

    def _inputs(self, embeddings: Tensor) -> Tensor:
        return self.forward_proj(embeddings.to(device=self.device, dtype=self.dtype))

    # ----- public API ----------------------------------------------------------------------
    @torch.inference_mode()
    def forward_hidden(self, embeddings: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Final hidden states ([B, T, hidden]) of a right-padded batch, no cache."""
        b, t, _ = embeddings.shape
        lengths = _lengths_or_full(lengths, b, t, self.device)
        positions = torch.arange(t, device=self.device).expand(b, t)
        return self._layers(self._inputs(embeddings), positions, _prefill_mask(lengths, t))

    def new_cache(self, pool: BlockManager, owner: str = "llm") -> PagedKVCache:
        """An empty KV cache for this model on `pool`'s pages."""
        cfg = self.config
        return PagedKVCache(
            pool, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype, owner
        )

    def kv_bytes_per_position(self) -> int:
        cfg = self.config
        return PagedKVCache.position_bytes(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype
        )

    def private_cache(self, positions: list[int]) -> PagedKVCache:
        """A cache on a pool of its own, just large enough for sequences of `positions`."""
        page = page_bytes_for([self.kv_bytes_per_position()])
        per_page = page // self.kv_bytes_per_position()
        pages = max(1, sum(blocks_for(n, per_page) for n in positions))
        pool = BlockManager(pages, page, self.device)
        return self.new_cache(pool)

    @torch.inference_mode()
    def extend(self, cache: PagedKVCache, keys: list[Hashable], chunks: list[Tensor]) -> Tensor:
        """Append chunks[i] ([T_i, embed_dim]) to sequence keys[i]; return each chunk's last
        hidden state [B, hidden].

        One call serves a whole prompt (an empty sequence), a chunk of one (chunked prefill), or
        one new sentence per sequence (a step): every chunk attends to its sequence's cached
        positions and causally within itself.
        """
        if not chunks or any(c.ndim != 2 or c.shape[0] == 0 for c in chunks):
            raise ValueError("extend needs at least one non-empty [T, embed_dim] chunk")
        if len(keys) != len(chunks):
            raise ValueError(f"extend got {len(chunks)} chunks for {len(keys)} sequences")
        counts = [int(c.shape[0]) for c in chunks]
        t = max(counts)
        batch = chunks[0].new_zeros((len(chunks), t, chunks[0].shape[1]))
        for i, c in enumerate(chunks):
            batch[i, : c.shape[0]] = c
        starts = cache.grow(keys, counts)
        try:
            slots = cache.slots(keys, starts, counts, t)
            table, longest = cache.table(keys)
            dev = self.device
            start_t = torch.tensor(starts, device=dev)
            count_t = torch.tensor(counts, device=dev)
            positions = start_t[:, None] + torch.arange(t, device=dev)[None, :]
            # Query t of row b sees keys j <= start_b + t that the row holds.
            keys_idx = torch.arange(longest, device=dev)[None, None, :]
            mask = (keys_idx <= positions[:, :, None]) & (
                keys_idx < (start_t + count_t)[:, None, None]
            )
            hidden = self._layers(
                self._inputs(batch), positions, mask[:, None], (cache, slots, table, longest)
            )
        except BaseException:
            cache.shrink(keys, counts)
            raise
        return hidden[torch.arange(len(chunks), device=self.device), count_t - 1]

    @torch.inference_mode()
    def project(self, hidden: Tensor) -> Tensor:
        """Map final hidden states to SONAR embeddings (`reverse_proj`), in fp32."""
        return self.reverse_proj(hidden).float()


def _lengths_or_full(lengths: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((b,), t, dtype=torch.long, device=device)
    return lengths.to(device)


def _prefill_mask(lengths: Tensor, t: int) -> Tensor:
    """[B, 1, T, T] boolean: causal and within each row's length."""
    idx = torch.arange(t, device=lengths.device)
    causal = idx[None, :] <= idx[:, None]
    valid = idx[None, :] < lengths[:, None]
    return (causal[None] & valid[:, None, :])[:, None]


def _rope_inv_freq(cfg: SonarLLMConfig) -> tuple[Tensor, float]:
    """Inverse frequencies as transformers computes them (llama3 scaling included)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = cfg.to_hf_llama_config()
    rope_type = "default"
    if cfg.rope_scaling:
        rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported")
    # Real numbers even when the module is built on the meta device (loading builds it there).
    with torch.device("cpu"):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq, float(scaling)
