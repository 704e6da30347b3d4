"""The Llama stack over embeddings equals transformers' Llama, cached and uncached."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from models.block_manager import BlockManager, OutOfPages
from models.config import SonarLLMConfig
from models.sonar_llm import SonarLLM

LLAMA3_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

CONFIGS = {
    # heads × head_dim (96) ≠ hidden (64), as in the released 600M and 900M configs
    "wide-attention": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=24),
    "narrow-attention": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "grouped-kv": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16),
}


def make(name: str, seed: int = 0) -> tuple[SonarLLM, LlamaForCausalLM]:
    cfg = SonarLLMConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        vocab_size=40,
        rope_scaling=LLAMA3_ROPE,
        embed_dim=32,
        **CONFIGS[name],  # type: ignore[arg-type]
    )
    torch.manual_seed(seed)
    model = SonarLLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    hf = LlamaForCausalLM(cfg.to_hf_llama_config()).eval()
    llama_state = {
        k.removeprefix("llama_model."): v
        for k, v in model.state_dict().items()
        if k.startswith("llama_model.")
    }
    hf.load_state_dict(llama_state, strict=True)
    return model, hf


def hf_hidden(model: SonarLLM, hf: LlamaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = hf(inputs_embeds=model.forward_proj(x), output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_uncached_equals_transformers(name: str) -> None:
    model, hf = make(name)
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(model.forward_hidden(x), hf_hidden(model, hf, x), atol=1e-5, rtol=0)


def small_pool(model: SonarLLM, pages: int) -> BlockManager:
    """A pool of `pages` pages holding 4 positions each: many block boundaries."""
    return BlockManager(pages, 4 * model.kv_bytes_per_position(), "cpu")


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_prefill_and_steps_equal_transformers(name: str) -> None:
    model, hf = make(name)
    x = torch.randn(3, 14, 32)
    ref = hf_hidden(model, hf, x)
    lengths = [4, 9, 1]  # ragged prompts in one batch
    cache = model.new_cache(small_pool(model, 16))
    for i in range(3):
        cache.add(i)
    last = model.extend(cache, [0, 1, 2], [x[i, :n] for i, n in enumerate(lengths)])
    for i, n in enumerate(lengths):
        torch.testing.assert_close(last[i], ref[i, n - 1], atol=1e-5, rtol=0)
    for _ in range(4):
        hidden = model.extend(cache, [0, 1, 2], [x[i, n : n + 1] for i, n in enumerate(lengths)])
        lengths = [n + 1 for n in lengths]
        for i, n in enumerate(lengths):
            torch.testing.assert_close(hidden[i], ref[i, n - 1], atol=1e-5, rtol=0)
    assert [cache.length(i) for i in range(3)] == lengths
    assert cache.used_bytes() == sum(lengths) * cache.bytes_per_position
    assert cache.allocated_bytes() == sum(-(-n // 4) for n in lengths) * cache.pool.page_bytes


def test_chunked_prefill_equals_one_prefill() -> None:
    model, hf = make("grouped-kv")
    x = torch.randn(2, 23, 32)
    ref = hf_hidden(model, hf, x)
    cache = model.new_cache(small_pool(model, 16))
    cache.add("a")
    cache.add("b")
    # Chunks of different sizes, rows at different positions in one call.
    model.extend(cache, ["a"], [x[0, :5]])
    hidden = model.extend(cache, ["a", "b"], [x[0, 5:12], x[1, :3]])
    torch.testing.assert_close(hidden[0], ref[0, 11], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1], ref[1, 2], atol=1e-5, rtol=0)
    hidden = model.extend(cache, ["b", "a"], [x[1, 3:23], x[0, 12:23]])
    torch.testing.assert_close(hidden[0], ref[1, 22], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1], ref[0, 22], atol=1e-5, rtol=0)


def test_sequences_join_and_leave_without_moving_others() -> None:
    model, hf = make("wide-attention")
    x = torch.randn(3, 40, 32)
    ref = hf_hidden(model, hf, x)
    pool = small_pool(model, 20)
    cache = model.new_cache(pool)
    for i in range(2):
        cache.add(i)
    model.extend(cache, [0, 1], [x[0, :3], x[1, :30]])
    assert pool.used_pages == 1 + 8
    cache.remove(1)  # the long one finishes: its pages are free at once
    assert pool.used_pages == 1
    cache.add(2)
    model.extend(cache, [2], [x[2, :5]])
    hidden = model.extend(cache, [2, 0], [x[2, 5:6], x[0, 3:4]])
    torch.testing.assert_close(hidden[0], ref[2, 5], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1], ref[0, 3], atol=1e-5, rtol=0)
    assert cache.used_bytes() == 10 * cache.bytes_per_position
    cache.remove(0)
    cache.remove(2)
    assert pool.used_pages == 0


def test_a_failed_extend_gives_its_pages_back() -> None:
    model, _ = make("grouped-kv")
    pool = small_pool(model, 4)
    cache = model.new_cache(pool)
    cache.add(0)
    model.extend(cache, [0], [torch.randn(3, 32)])
    with pytest.raises(OutOfPages):
        model.extend(cache, [0], [torch.randn(20, 32)])
    assert cache.length(0) == 3 and pool.used_pages == 1
    with pytest.raises(RuntimeError):
        model.extend(cache, [0], [torch.randn(2, 31)])  # wrong width: fails inside the layers
    assert cache.length(0) == 3 and pool.used_pages == 1


def test_cache_grows_page_by_page() -> None:
    model, hf = make("grouped-kv")
    x = torch.randn(1, 80, 32)
    ref = hf_hidden(model, hf, x)
    pool = small_pool(model, 20)
    cache = model.new_cache(pool)
    cache.add(0)
    model.extend(cache, [0], [x[0, :2]])
    for n in range(2, 80):
        hidden = model.extend(cache, [0], [x[0, n : n + 1]])
    assert pool.used_pages == 20
    torch.testing.assert_close(hidden[0], ref[0, 79], atol=1e-5, rtol=0)


# The released size configs (upstream SonarLLM_*.json): they must build, with the
# parameter counts the facts file gives (embedding excluded).
RELEASED = {
    "100M": (512, 8, 16, 32, 2048, 34e6),
    "300M": (1024, 10, 16, 64, 4096, 170e6),
    "600M": (1280, 16, 26, 64, 5120, 450e6),
    "900M": (1536, 17, 32, 64, 6144, 700e6),
}


@pytest.mark.parametrize("size", RELEASED)
def test_released_size_configs_build(size: str) -> None:
    hidden, layers, heads, head_dim, ffn, params = RELEASED[size]
    llama = {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "pretraining_tp": 1,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "head_dim": head_dim,
    }
    cfg = SonarLLMConfig.from_llama_dict(json.loads(json.dumps(llama)), vocab_size=128256)
    with torch.device("meta"):
        model = SonarLLM(cfg)
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert abs(non_embedding - params) / params < 0.1
    assert model.llama_model.lm_head.weight is model.llama_model.model.embed_tokens.weight


def test_stale_page_bytes_never_reach_attention() -> None:
    # Pages come back from the decoder or from uninitialised memory: all-ones bytes are NaN.
    model, hf = make("wide-attention")
    x = torch.randn(2, 9, 32)
    ref = hf_hidden(model, hf, x)
    pool = small_pool(model, 8)
    pool.buffer.fill_(255)
    cache = model.new_cache(pool)
    cache.add(0)
    cache.add(1)
    hidden = model.extend(cache, [0, 1], [x[0, :5], x[1, :9]])
    torch.testing.assert_close(hidden[0], ref[0, 4], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden[1], ref[1, 8], atol=1e-5, rtol=0)
