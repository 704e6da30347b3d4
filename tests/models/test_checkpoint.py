"""Checkpoint loading: every released layout, strict key matching, safe unpickling, convert."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, convert, load_sonar_llm, save_pretrained
from models.config import SonarLLMConfig
from models.sonar_llm import SonarLLM

ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
EMBED, LM_HEAD = "llama_model.model.embed_tokens.weight", "llama_model.lm_head.weight"


def tiny_config(**overrides: object) -> SonarLLMConfig:
    kwargs: dict = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=24,
        vocab_size=50,
        rope_scaling=ROPE,
        embed_dim=32,
    )
    return SonarLLMConfig(**{**kwargs, **overrides})


def random_model(cfg: SonarLLMConfig, seed: int = 0) -> SonarLLM:
    model = SonarLLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def released_config(cfg: SonarLLMConfig) -> dict:
    """config.json as released: no vocab_size in llama_config."""
    d = cfg.to_json_dict()
    del d["llama_config"]["vocab_size"]
    return d


def decoder_keys(n: int = 3) -> dict[str, torch.Tensor]:
    return {f"sonar_decoder.model.layers.{i}.weight": torch.zeros(2, 2) for i in range(n)}


def assert_same(loaded: SonarLLM, original: SonarLLM) -> None:
    got, want = loaded.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].float(), want[k].float()), k
    x = torch.randn(2, 5, original.config.embed_dim, generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.forward_hidden(x), original.forward_hidden(x))
    lm = loaded.llama_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tie survives loading


def write_hf_dir(path: Path, model: SonarLLM, layout: str) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(released_config(model.config)))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if layout == "bin":
        torch.save({**sd, **decoder_keys()}, path / "pytorch_model.bin")
    elif layout == "wrapped":
        torch.save(
            {"model_state_dict": {**sd, **decoder_keys()}, "epoch": 3}, path / "pytorch_model.bin"
        )
    elif layout == "safetensors":
        del sd[LM_HEAD]
        save_file(sd, path / "model.safetensors")
    elif layout == "sharded":
        del sd[LM_HEAD]
        keys = list(sd)
        halves = {"a.safetensors": keys[:10], "b.safetensors": keys[10:]}
        for name, part in halves.items():
            save_file({k: sd[k] for k in part}, path / name)
        weight_map = {k: name for name, part in halves.items() for k in part}
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize(
    ("layout", "ignored"),
    [
        ("bin", {"sonar_decoder": 3}),
        ("wrapped", {"sonar_decoder": 3, "epoch": 1}),
        ("safetensors", {}),
        ("sharded", {}),
    ],
)
def test_hf_dir_layouts(tmp_path: Path, layout: str, ignored: dict) -> None:
    original = random_model(tiny_config())
    write_hf_dir(tmp_path / "ckpt", original, layout)
    messages: list[str] = []
    model, report = load_sonar_llm(tmp_path / "ckpt", progress=messages.append)
    assert report.format == "hf-dir"
    assert report.config == original.config  # vocab_size inferred from embed_tokens
    assert report.ignored == ignored
    assert report.loaded == len(original.state_dict()) - 1  # lm_head is embed_tokens
    assert_same(model, original)
    assert any(m.startswith("reading ") and m.endswith(" MB) ...") for m in messages)
    assert any(m.startswith("... ") and " read in " in m for m in messages)
    assert messages[-1].startswith(f"loaded SONAR-LLM: {report.loaded} tensors in ")


def test_dtype_keeps_rope_in_fp32(tmp_path: Path) -> None:
    original = random_model(tiny_config())
    write_hf_dir(tmp_path / "ckpt", original, "safetensors")
    model, _ = load_sonar_llm(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_inv_freq.dtype == torch.float32
    assert torch.equal(model.rope_inv_freq, original.rope_inv_freq)
    assert not model.training


def training_checkpoint(
    tmp_path: Path, embed_dim: int = 1024, config_embed_dim: int | None = None
) -> tuple[SonarLLM, Path, Path]:
    """The authors' layout: torch.save of model/optimizer/scheduler/RNG + SonarLLM_*.json
    (which has no embed_dim; `config_embed_dim` adds one)."""
    cfg = tiny_config(embed_dim=embed_dim)
    original = random_model(cfg)
    trained = random_model(cfg)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    trained.reverse_proj(trained.forward_proj(torch.randn(3, embed_dim))).sum().backward()
    opt.step()
    sched.step()
    ddp = {f"module.{k}": v for k, v in original.state_dict().items()}
    ckpt = {
        "model_state_dict": {**ddp, **{f"module.{k}": v for k, v in decoder_keys(2).items()}},
        "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(),
        "epoch": 2,
        "global_step": 1234,
        "python_rng_state": random.getstate(),
        "numpy_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_states": [torch.get_rng_state()],
    }
    ckpt_path = tmp_path / "run" / "checkpoint_step_1234.pt"
    ckpt_path.parent.mkdir(parents=True)
    torch.save(ckpt, ckpt_path)
    llama = released_config(cfg)["llama_config"]
    cfg_path = tmp_path / "SonarLLM_tiny.json"
    data: dict = {"pretrained_model_name_or_path": "meta-llama/Llama-3.2-1B", "llama_config": llama}
    if config_embed_dim is not None:
        data["embed_dim"] = config_embed_dim
    cfg_path.write_text(json.dumps(data))
    return original, ckpt_path, cfg_path


def test_training_checkpoint(tmp_path: Path) -> None:
    original, ckpt_path, cfg_path = training_checkpoint(tmp_path)
    model, report = load_sonar_llm(ckpt_path, config=cfg_path)
    assert report.format == "training-checkpoint"
    assert report.config == original.config
    assert report.ignored == {
        "sonar_decoder": 2,
        "optimizer_state_dict": 1,
        "scheduler_state_dict": 1,
        "epoch": 1,
        "global_step": 1,
        "rng_state": 4,
    }
    assert report.files == [str(cfg_path), str(ckpt_path)]
    assert_same(model, original)
    with pytest.raises(CheckpointError, match="--config"):
        load_sonar_llm(ckpt_path)


def test_embed_dim_comes_from_the_weights_when_the_config_lacks_it(tmp_path: Path) -> None:
    original, ckpt_path, cfg_path = training_checkpoint(tmp_path / "a", embed_dim=48)
    assert "embed_dim" not in json.loads(cfg_path.read_text())
    model, report = load_sonar_llm(ckpt_path, config=cfg_path)
    assert report.config.embed_dim == model.config.embed_dim == 48
    assert report.config == original.config
    assert_same(model, original)
    # A config that gives embed_dim is believed, and checked: a mismatch names both shapes.
    _, ckpt_path, cfg_path = training_checkpoint(tmp_path / "b", embed_dim=48, config_embed_dim=32)
    with pytest.raises(CheckpointError) as err:
        load_sonar_llm(ckpt_path, config=cfg_path)
    msg = str(err.value)
    assert "forward_proj.linear.weight: checkpoint [64, 48] vs config [64, 32]" in msg
    assert "reverse_proj.linear.weight: checkpoint [48, 64] vs config [32, 64]" in msg


def test_numpy1_rng_state_name(tmp_path: Path) -> None:
    """numpy 1.x pickled its RNG state via numpy.core.multiarray._reconstruct."""
    original = random_model(tiny_config())
    legacy = tmp_path / "old.pt"
    torch.save(
        {"model_state_dict": original.state_dict(), "numpy_rng_state": np.random.get_state()},
        legacy,
        _use_new_zipfile_serialization=False,
    )  # plain pickle: patchable bytes
    raw = legacy.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    legacy.write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    (tmp_path / "config.json").write_text(json.dumps(released_config(original.config)))
    model, report = load_sonar_llm(legacy)
    assert report.ignored == {"rng_state": 1}
    assert_same(model, original)


def write_bin(tmp_path: Path, sd: dict, cfg: SonarLLMConfig) -> Path:
    path = tmp_path / "ckpt"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(released_config(cfg)))
    torch.save(sd, path / "pytorch_model.bin")
    return path


def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = random_model(tiny_config()).state_dict()
    del sd["llama_model.model.layers.1.mlp.up_proj.weight"], sd["reverse_proj.linear.bias"]
    with pytest.raises(CheckpointError) as err:
        load_sonar_llm(write_bin(tmp_path, sd, tiny_config()))
    msg = str(err.value)
    assert "missing keys: llama_model.model.layers.1.mlp.up_proj.weight, " in msg
    assert "reverse_proj.linear.bias" in msg and "\n" not in msg


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    sd = random_model(tiny_config()).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_sonar_llm(write_bin(tmp_path, sd, tiny_config(hidden_size=48)))
    msg = str(err.value)
    assert "llama_model.model.embed_tokens.weight: checkpoint [50, 64] vs config [50, 48]" in msg
    assert msg.endswith(" and 19 more")  # 24 keys differ: the list is cut short


def test_unexpected_key_and_wrong_prefix(tmp_path: Path) -> None:
    sd = random_model(tiny_config()).state_dict()
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra_head\.weight"):
        load_sonar_llm(
            write_bin(tmp_path / "a", {**sd, "extra_head.weight": torch.zeros(1)}, tiny_config())
        )
    with pytest.raises(CheckpointError, match="none of the SONAR-LLM weights"):
        load_sonar_llm(
            write_bin(tmp_path / "b", {f"net.{k}": v for k, v in sd.items()}, tiny_config())
        )


class Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["ckpt.pt", "pytorch_model.bin"])
def test_hostile_pickle_is_refused(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(released_config(cfg)))
    torch.save(
        {"model_state_dict": random_model(cfg).state_dict(), "x": Hostile(marker)}, tmp_path / name
    )
    source = tmp_path / name if name.endswith(".pt") else tmp_path
    with pytest.raises(CheckpointError, match=r"not allowed.*was not loaded"):
        load_sonar_llm(source)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("text.pt", "not a readable PyTorch checkpoint"),
        ("notes.txt", "not a checkpoint"),
        ("empty_dir", "not a SONAR-LLM checkpoint directory"),
        ("missing", "no such file or directory"),
        ("json_dir", "not a SONAR-LLM config"),
    ],
)
def test_not_a_checkpoint(tmp_path: Path, kind: str, expected: str) -> None:
    target = tmp_path / kind
    if kind.endswith((".pt", ".txt")):
        target.write_text("hello\n")
    elif kind == "empty_dir":
        target.mkdir()
    elif kind == "json_dir":
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"hidden_size": 64}))
        torch.save(random_model(tiny_config()).state_dict(), target / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_sonar_llm(target)
    assert str(target) in str(err.value) and expected in str(err.value)


def test_repo_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)  # so "raxtemur/..." is not a local path
    with pytest.raises(CheckpointError) as err:
        load_sonar_llm("raxtemur/sonar-llm-900m")
    msg = str(err.value)
    assert "https://huggingface.co/raxtemur/sonar-llm-900m" in msg
    assert "config.json" in msg and "pytorch_model.bin" in msg
    assert "huggingface-cli download raxtemur/sonar-llm-900m" in msg


def test_convert_round_trip(tmp_path: Path) -> None:
    original, ckpt_path, cfg_path = training_checkpoint(tmp_path)
    report = convert(ckpt_path, tmp_path / "hf", config=cfg_path)
    assert report.format == "training-checkpoint"
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert LM_HEAD not in stored and EMBED in stored
    model, report = load_sonar_llm(tmp_path / "hf")
    assert report.format == "hf-dir" and report.ignored == {}
    assert_same(model, original)
    # The .bin flavour carries lm_head explicitly, as the authors' files do.
    save_pretrained(model, tmp_path / "bin", safetensors=False)
    assert LM_HEAD in torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert_same(load_sonar_llm(tmp_path / "bin")[0], original)


def test_serving_load_checks_the_token_head_then_drops_it(tmp_path: Path) -> None:
    original = random_model(tiny_config())
    write_hf_dir(tmp_path / "ckpt", original, "safetensors")
    model, _ = load_sonar_llm(tmp_path / "ckpt", keep_token_head=False)
    head = model.llama_model.model.embed_tokens.weight
    assert head.is_meta and head.shape == original.llama_model.model.embed_tokens.weight.shape
    assert model.llama_model.lm_head.weight is head
    x = torch.randn(2, 5, original.config.embed_dim, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.forward_hidden(x), original.forward_hidden(x))
    # Its shape is still checked against the config.
    state = original.state_dict()
    state[EMBED] = torch.zeros(7, original.config.hidden_size)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_sonar_llm(write_bin(tmp_path / "bad", state, tiny_config()), keep_token_head=False)


def test_safetensors_are_mapped_not_read(tmp_path: Path) -> None:
    """Every dtype and shape reads back as safetensors' own reader gives it, as views of one
    mapping of the whole file (nothing copied until used, so bf16 loads convert tensor by
    tensor)."""
    from models.checkpoint import _read_weights

    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(7),
        "flag": torch.tensor(True),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    mapped = _read_weights(path, lambda _msg: None)
    reference = load_file(path)
    assert mapped.keys() == reference.keys()
    for key, value in reference.items():
        assert mapped[key].dtype == value.dtype and mapped[key].shape == value.shape, key
        assert torch.equal(mapped[key], value), key
    storages = {mapped[k].untyped_storage().data_ptr() for k in mapped if mapped[k].numel()}
    assert len(storages) == 1
    assert mapped["f32"].untyped_storage().nbytes() == path.stat().st_size


@pytest.mark.parametrize(
    "damage",
    ["truncated", "header_length", "not_json", "range_past_end", "unknown_dtype"],
)
def test_damaged_safetensors_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    from models.checkpoint import _read_weights

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    if damage == "truncated":
        data = data[:-10]
    elif damage == "header_length":
        data = (10**12).to_bytes(8, "little") + data[8:]
    elif damage == "not_json":
        data = data[:8] + b"{" * length + data[8 + length :]
    else:
        if damage == "range_past_end":
            header["w"]["data_offsets"] = [0, 4096]
        else:
            header["w"]["dtype"] = "F128"
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        assert len(raw) == length
        data = data[:8] + raw + data[8 + length :]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _read_weights(path, lambda _msg: None)
