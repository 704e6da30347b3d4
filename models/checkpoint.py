"""Load SONAR-LLM weights from every released format, safely and strictly; save the HF layout.

Sources: a directory in the released Hugging Face layout (config.json + model.safetensors or
pytorch_model.bin, sharded or not), the authors' training checkpoint (.pt/.pth/.bin plus a
separate `SonarLLM_*.json` config), or a Hugging Face repo id fetched into the normal HF cache.

Pickled files are read with `torch.load(weights_only=True)` and a short allow-list, so a
checkpoint can never run code. Keys are matched strictly: upstream's `strict=False` silently
loads nothing when a prefix is off, so here every weight must be found with its exact shape.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.config import ConfigError, SonarLLMConfig
from models.sonar_llm import SonarLLM

__all__ = [
    "CheckpointError",
    "LoadReport",
    "convert",
    "load_sonar_llm",
    "prefetch",
    "save_pretrained",
]

EMBED_KEY = "llama_model.model.embed_tokens.weight"
FORWARD_PROJ_KEY = "forward_proj.linear.weight"  # [hidden, embed_dim]
LM_HEAD_KEY = "llama_model.lm_head.weight"
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
# Preference order inside a Hugging Face directory: safetensors first (no pickle at all).
_HF_WEIGHTS = (
    SAFETENSORS_NAME,
    SAFETENSORS_NAME + ".index.json",
    BIN_NAME,
    BIN_NAME + ".index.json",
)
_TRAINING_SUFFIXES = (".pt", ".pth", ".bin")
# Top-level entries that hold the model's own state dict in a wrapped checkpoint.
_MODEL_ENTRIES = ("model_state_dict", "state_dict", "model")
# Wrappers whose prefixes end up in state-dict keys: DDP (`module.`) and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MODEL_PREFIXES = ("llama_model.", "forward_proj.", "reverse_proj.")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.bin", "*.json"]
_MAX_LISTED = 10

Progress = Callable[[str], None]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, keys or shapes."""


@dataclass
class LoadReport:
    """What `load_sonar_llm` read and what it left out."""

    source: str
    format: str  # "hf-dir" | "hf-hub" | "training-checkpoint"
    config: SonarLLMConfig
    loaded: int
    ignored: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _safe_globals() -> list[Any]:
    """The only non-torch objects a checkpoint may hold: numpy's RNG state.

    `np.random.get_state()` pickles as an ndarray (`_reconstruct` + `ndarray`) of a uint32
    dtype (`dtype`, whose BUILD step is checked against the concrete dtype class). numpy 2
    writes `numpy._core.multiarray._reconstruct`, numpy 1 wrote `numpy.core...`: both names
    are mapped to the one function. Optimizer/scheduler state dicts, python RNG tuples and
    OrderedDict are already allowed by torch's weights-only unpickler.
    """
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    reconstruct = core.multiarray._reconstruct
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _listed(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _size_mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _torch_load(path: Path) -> Any:
    """`torch.load` that can only rebuild tensors and plain containers (never runs code)."""
    # mmap keeps big checkpoints (optimizer state included) out of RAM until touched;
    # it needs the zip format, so pre-1.6 legacy files are read normally.
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: contains code or objects that are not allowed{what}; it was not loaded "
            "(only tensors, optimizer/scheduler state, counters and RNG state are accepted)"
        ) from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _mmap_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file as views of one copy-on-write memory map of it, as
    `torch.load(mmap=True)` gives for .bin files: nothing is read until a tensor is used, so a
    checkpoint converted tensor by tensor (to bf16, to the GPU) never sits in memory whole.
    The format is a little-endian u64 header length, a JSON header (dtype, shape, byte range of
    each tensor) and the raw bytes; the header is only parsed, nothing in it is executed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 2 <= length <= size - 8:
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    base = 8 + length
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"tensor {name}: unsupported entry {info!r}")
        shape, (begin, end) = [int(n) for n in info["shape"]], info["data_offsets"]
        itemsize = dtype.itemsize
        numel = int(np.prod(shape)) if shape else 1
        if end - begin != numel * itemsize or not 0 <= begin <= end <= size - base:
            raise ValueError(f"tensor {name}: byte range {begin}..{end} does not hold {shape}")
        if (base + begin) % itemsize:
            raise ValueError(f"tensor {name}: not aligned to its {itemsize}-byte elements")
        t = torch.empty(0, dtype=dtype)
        offset = (base + begin) // itemsize
        out[name] = t.set_(storage, offset, shape) if numel else t.view(shape)  # type: ignore[call-overload]
    return out


def _read_weights(path: Path, say: Progress) -> Any:
    say(f"reading {path.name} ({_size_mb(path)}) ...")
    start = time.perf_counter()
    if path.suffix == ".safetensors":
        try:
            weights = _mmap_safetensors(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        weights = _torch_load(path)
    say(f"... {path.name} read in {time.perf_counter() - start:.1f} s")
    return weights


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None


def _shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map") if index.is_file() else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' in the shard index")
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"{index}: shard files missing: {_listed(absent)}")
    return shards


def _category(key: str) -> str:
    return "rng_state" if "rng" in key.lower() else key


def _split(obj: Any, where: Path) -> tuple[dict[str, Tensor], Counter[str]]:
    """The model's tensors (keys normalised) and counts of everything left out, by category."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}")
    ignored: Counter[str] = Counter()
    entry = next((k for k in _MODEL_ENTRIES if isinstance(obj.get(k), Mapping)), None)
    if entry is not None:
        for key in obj:
            if key != entry:
                ignored[_category(str(key))] += 1
        obj = obj[entry]
    elif any(not isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{where}: no model state dict (expected 'model_state_dict' or tensors); "
            f"top-level keys: {_listed(map(str, obj))}"
        )
    state: dict[str, Tensor] = {}
    for raw_key, value in obj.items():
        key = str(raw_key)
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith("sonar_decoder."):
            ignored["sonar_decoder"] += 1  # the frozen SONAR decoder, a training-time submodule
        elif key.endswith("rotary_emb.inv_freq"):
            ignored["rotary_emb"] += 1  # old transformers saved RoPE buffers; recomputed here
        elif not isinstance(value, Tensor):
            raise CheckpointError(
                f"{where}: entry {raw_key} is {type(value).__name__}, not a tensor"
            )
        elif key in state:
            raise CheckpointError(f"{where}: key {key} appears twice (with and without a prefix)")
        else:
            state[key] = value
    return state, ignored


def _read_all(files: list[Path], say: Progress) -> tuple[dict[str, Tensor], Counter[str]]:
    state: dict[str, Tensor] = {}
    ignored: Counter[str] = Counter()
    for path in files:
        part, part_ignored = _split(_read_weights(path, say), path)
        clash = state.keys() & part.keys()
        if clash:
            raise CheckpointError(f"{path}: keys already read from another shard: {_listed(clash)}")
        state.update(part)
        ignored.update(part_ignored)
    return state, ignored


def _hf_dir_files(directory: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        path = directory / name
        if path.is_file():
            return _shards(path) if name.endswith(".index.json") else [path]
    present = sorted(p.name for p in directory.iterdir())[:_MAX_LISTED]
    raise CheckpointError(
        f"{directory}: not a SONAR-LLM checkpoint directory (expected config.json with "
        f"model.safetensors or pytorch_model.bin); found: {', '.join(present) or 'nothing'}"
    )


def _training_config(path: Path) -> Path:
    """The config that goes with a training checkpoint when `config=` was not given."""
    beside = path.parent / CONFIG_NAME
    if beside.is_file():
        return beside
    candidates = sorted(path.parent.glob("SonarLLM*.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(
        f"{path}: a training checkpoint needs its config: pass --config SonarLLM_<size>.json "
        f"(no config.json or single SonarLLM_*.json next to it)"
    )


def _make_config(path: Path, state: Mapping[str, Tensor]) -> SonarLLMConfig:
    """Parse a released config.json or SonarLLM_*.json; a missing vocab_size comes from the
    embedding's shape and a missing embed_dim from forward_proj's (the authors' SonarLLM_*.json
    has neither). A config that gives them is checked against the weights later."""
    data = _read_json(path)
    llama = data.get("llama_config") if isinstance(data, dict) else None
    if not isinstance(llama, dict):
        raise CheckpointError(f"{path}: not a SONAR-LLM config (expected a 'llama_config' object)")
    vocab = next((state[k].shape[0] for k in (EMBED_KEY, LM_HEAD_KEY) if k in state), None)
    embed_dim = data.get("embed_dim")
    if embed_dim is None:
        proj = state.get(FORWARD_PROJ_KEY)
        embed_dim = int(proj.shape[1]) if proj is not None and proj.ndim == 2 else 1024
    try:
        return SonarLLMConfig.from_llama_dict(
            llama,
            embed_dim=embed_dim,
            add_begin=bool(data.get("add_begin", False)),
            vocab_size=vocab,
        )
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hub_error(repo_id: str, error: Exception) -> CheckpointError:
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(error, RepositoryNotFoundError):
        reason = "repository not found, private or gated"
    elif constants.HF_HUB_OFFLINE or isinstance(error, LocalEntryNotFoundError):
        reason = "offline or unreachable, and not in the local Hugging Face cache"
    else:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return CheckpointError(
        f"{repo_id} is not a local path and could not be fetched from the Hugging Face Hub "
        f"({reason}). Download config.json and model.safetensors or pytorch_model.bin from "
        f"https://huggingface.co/{repo_id} into any directory and pass that directory as the "
        f"model, or run `huggingface-cli download {repo_id}` on a connected machine and copy "
        f"its Hugging Face cache ($HF_HOME, default ~/.cache/huggingface) here."
    )


def _download(repo_id: str, say: Progress) -> Path:
    from huggingface_hub import snapshot_download

    say(f"fetching {repo_id} from the Hugging Face Hub (or its local cache)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # any failure here means "cannot get the files": explain the way out
        raise _hub_error(repo_id, e) from e


def _no_such_source(source: str | Path) -> CheckpointError:
    return CheckpointError(
        f"{source}: no such file or directory (expected a checkpoint directory, a "
        f".pt/.pth/.bin training checkpoint or a Hugging Face repo id like owner/name)"
    )


def prefetch(source: str | Path, *, progress: Progress | None = None) -> tuple[str, Path]:
    """Make `source` loadable offline. A Hugging Face repo id is fetched into the Hugging Face
    cache (the files `load_sonar_llm` reads: the same allow patterns); a local path needs
    nothing. Returns ("hf-hub" or "local", the local path); raises CheckpointError (one line,
    naming the repo) when the files cannot be had."""
    say: Progress = progress or (lambda _msg: None)
    path = Path(source).expanduser()
    if path.exists():
        return "local", path
    if _REPO_ID.fullmatch(str(source)):
        return "hf-hub", _download(str(source), say)
    raise _no_such_source(source)


def _require_model_keys(state: dict[str, Tensor], where: str) -> None:
    # A wrong prefix would otherwise surface as "everything missing" (or a vocab_size error).
    if not any(k.startswith(_MODEL_PREFIXES) for k in state):
        found = _listed(list(state)[:5]) or "no model tensors"
        raise CheckpointError(f"{where}: contains none of the SONAR-LLM weights (found {found})")


def _check_keys(
    state: dict[str, Tensor], expected: dict[str, Tensor], cfg: SonarLLMConfig, where: str
) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    needed = {
        k: v for k, v in expected.items() if not (cfg.tie_word_embeddings and k == LM_HEAD_KEY)
    }
    problems = []
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs config {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if mismatched:
        problems.append(
            f"shape mismatch (config does not match the weights): {_listed(mismatched, 5)}"
        )
    missing = [k for k in needed if k not in state]
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))


def _empty_model(cfg: SonarLLMConfig) -> SonarLLM:
    """A model whose weights will be replaced: on the meta device when it can be built there
    (no allocation, no random init), else on CPU."""
    try:
        with torch.device("meta"):
            model = SonarLLM(cfg)
        if all(b.device.type != "meta" for b in model.buffers()):
            return model
    except (NotImplementedError, RuntimeError):
        pass  # RoPE set-up copies tensors to CPU, which meta tensors cannot do
    with torch.device("cpu"):
        return SonarLLM(cfg)


def load_sonar_llm(
    source: str | Path,
    *,
    config: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    keep_token_head: bool = True,
) -> tuple[SonarLLM, LoadReport]:
    """Load a SONAR-LLM from an HF directory, a training checkpoint or an HF repo id.

    Returns the model in eval mode on `device` in `dtype`, and a report of what was read.
    With `keep_token_head=False` (serving) the token embedding / lm_head that inference never
    computes is checked (its shape, against the config) and then not kept: it stays a
    shape-only tensor on the meta device (0.8 GB less for the 900M model in fp32). Such a
    model cannot be saved again.
    """
    say: Progress = progress or (lambda _msg: None)
    started = time.perf_counter()
    say(f"resolving {source}")
    path = Path(source).expanduser()
    config_path = Path(config).expanduser() if config is not None else None
    if config_path is not None and not config_path.is_file():
        raise CheckpointError(f"config {config_path} does not exist or is not a file")

    fmt, weight_files, config_path = _locate(source, path, config_path, say)
    state, ignored = _read_all(weight_files, say)
    if config_path is None:  # after reading, so a file that is no checkpoint says so first
        config_path = _training_config(path)
    where = ", ".join(str(p) for p in weight_files[:3]) + (" ..." if len(weight_files) > 3 else "")
    _require_model_keys(state, where)
    cfg = _make_config(config_path, state)
    say("building model")
    model = _empty_model(cfg)
    _check_keys(state, model.state_dict(), cfg, where)

    tensors = _converted(state, cfg, device, dtype, keep_token_head)
    del state  # the only other reference to the file's tensors
    _install(model, tensors, cfg, device)
    loaded = len(tensors) - int(cfg.tie_word_embeddings)
    say(f"loaded SONAR-LLM: {loaded} tensors in {time.perf_counter() - started:.1f} s")
    report = LoadReport(
        source=str(source),
        format=fmt,
        config=cfg,
        loaded=loaded,
        ignored=dict(ignored),
        files=[str(config_path), *map(str, weight_files)],
    )
    return model, report


def _locate(
    source: str | Path, path: Path, config_path: Path | None, say: Progress
) -> tuple[str, list[Path], Path | None]:
    """The source's format, its weight files and its config (None: a training checkpoint's,
    found after reading)."""
    if path.is_dir() or (not path.exists() and _REPO_ID.fullmatch(str(source))):
        fmt = "hf-dir" if path.is_dir() else "hf-hub"
        directory = path if path.is_dir() else _download(str(source), say)
        weight_files = _hf_dir_files(directory)
        if config_path is None:
            config_path = directory / CONFIG_NAME
            if not config_path.is_file():
                raise CheckpointError(f"{directory}: no config.json (pass --config)")
        return fmt, weight_files, config_path
    if path.is_file() and path.suffix in _TRAINING_SUFFIXES:
        return "training-checkpoint", [path], config_path
    if path.exists():
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a directory with config.json and "
            f"model.safetensors or pytorch_model.bin, or a .pt/.pth/.bin training checkpoint)"
        )
    raise _no_such_source(source)


def _converted(
    state: dict[str, Tensor],
    cfg: SonarLLMConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_token_head: bool,
) -> dict[str, Tensor]:
    """Each tensor converted and placed once (the unused token head as a shape only)."""
    unused = set() if keep_token_head else {EMBED_KEY, LM_HEAD_KEY}
    tensors = {
        k: (
            torch.empty(v.shape, dtype=dtype, device="meta")
            if k in unused
            else v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        )
        for k, v in state.items()
        if k != LM_HEAD_KEY or not cfg.tie_word_embeddings
    }
    if cfg.tie_word_embeddings:
        # A tied lm_head is never computed; embed_tokens' copy is the one kept.
        tensors[LM_HEAD_KEY] = tensors[EMBED_KEY]
    return tensors


def _install(
    model: SonarLLM, tensors: dict[str, Tensor], cfg: SonarLLMConfig, device: torch.device | str
) -> None:
    """Hand `tensors` to the model as its parameters (assign=True): no second copy, and the
    RoPE buffer keeps its fp32 precision."""
    model.load_state_dict(tensors, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.llama_model.lm_head.weight = model.llama_model.model.embed_tokens.weight
    # Everything else is already on the device; only buffers built at construction move.
    model.rope_inv_freq = model.rope_inv_freq.to(device)
    model.eval()


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    # Write beside and rename: a model still memory-mapped from the old file keeps working.
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: SonarLLM, dst: str | Path, *, safetensors: bool = True) -> Path:
    """Write the released HF layout: config.json + model.safetensors (or pytorch_model.bin)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copies: dict[int, Tensor] = {}  # tied parameters are copied to CPU once
    state = {
        k: copies.setdefault(id(v), v.detach().to("cpu").contiguous())
        for k, v in model.state_dict(keep_vars=True).items()
    }
    if safetensors:
        from safetensors.torch import save_file

        if model.config.tie_word_embeddings:
            state.pop(LM_HEAD_KEY)  # safetensors refuses shared tensors; tie restores it
        _replace_atomically(
            dst / SAFETENSORS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"})
        )
    else:
        _replace_atomically(dst / BIN_NAME, lambda p: torch.save(state, p))
    config_text = json.dumps(model.config.to_json_dict(), indent=2) + "\n"
    _replace_atomically(dst / CONFIG_NAME, lambda p: p.write_text(config_text))
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    config: str | Path | None = None,
    progress: Progress | None = None,
) -> LoadReport:
    """Load any supported source on CPU in fp32 and write it as an HF safetensors directory."""
    model, report = load_sonar_llm(src, config=config, progress=progress)
    save_pretrained(model, dst, safetensors=True)
    if progress is not None:
        progress(f"wrote {Path(dst) / SAFETENSORS_NAME}")
    return report
