"""SONAR-LLM configuration: the Llama stack's hyper-parameters plus the SONAR embedding width."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("sonar_llm.config")

# LlamaConfig keys that do not change the forward pass: accepted in released configs, not kept.
_IGNORED_LLAMA_KEYS = frozenset(
    {
        "initializer_range",
        "use_cache",
        "pretraining_tp",
        "attention_dropout",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "transformers_version",
        "model_type",
        "architectures",
        "_name_or_path",
        "output_hidden_states",
        "return_dict",
    }
)


class ConfigError(ValueError):
    """A configuration that cannot describe a SONAR-LLM model."""


@dataclass(frozen=True)
class SonarLLMConfig:
    """Everything needed to build the model; mirrors the released `llama_config` dict."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    embed_dim: int = 1024
    add_begin: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "embed_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")

    @classmethod
    def from_llama_dict(
        cls,
        llama: dict[str, Any],
        *,
        embed_dim: int = 1024,
        add_begin: bool = False,
        vocab_size: int | None = None,
    ) -> SonarLLMConfig:
        """Build from a released `llama_config` dict; `vocab_size` fills a missing entry."""
        known = {f for f in cls.__dataclass_fields__ if f not in ("embed_dim", "add_begin")}
        unknown = set(llama) - known - _IGNORED_LLAMA_KEYS
        if unknown:
            # Other LlamaConfig fields (bookkeeping of newer transformers versions) do not change
            # inference; say so rather than refuse a released checkpoint.
            log.warning("ignoring llama_config keys: %s", ", ".join(sorted(unknown)))
        kwargs = {k: v for k, v in llama.items() if k in known}
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in kwargs]
        if missing:
            raise ConfigError(f"llama_config lacks {', '.join(missing)}")
        kwargs.setdefault("num_key_value_heads", kwargs["num_attention_heads"])
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
        if "vocab_size" not in kwargs:
            if vocab_size is None:
                raise ConfigError("llama_config has no vocab_size and none could be inferred")
            kwargs["vocab_size"] = vocab_size
        return cls(**kwargs, embed_dim=embed_dim, add_begin=add_begin)

    def llama_dict(self) -> dict[str, Any]:
        """The `llama_config` part, as the released config.json holds it."""
        d = asdict(self)
        d.pop("embed_dim")
        d.pop("add_begin")
        return d

    def to_json_dict(self) -> dict[str, Any]:
        """The released Hugging Face layout's config.json content."""
        return {
            "llama_config": self.llama_dict(),
            "embed_dim": self.embed_dim,
            "add_begin": self.add_begin,
        }

    def to_hf_llama_config(self) -> Any:
        """A `transformers.LlamaConfig` with the same weights layout (used by tests and RoPE)."""
        from transformers import LlamaConfig

        return LlamaConfig(**self.llama_dict())
