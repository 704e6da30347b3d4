"""How much memory the caches may take, and byte sizes as people write them.

With no `cache_memory` setting the budget is a share of what is free once the model is loaded:
on a GPU, of the device memory `torch.cuda.mem_get_info` reports free (as vLLM's
`gpu_memory_utilization` leaves room for activations); on a CPU, of the RAM the kernel reports
available. The rest stays for activations (a decoder step's logits, encoder batches) and for
the process itself.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

import torch

from models.block_manager import BlockManager, page_bytes_for

if TYPE_CHECKING:
    from models.pipeline import SonarLLMPipeline

log = logging.getLogger("sonar_llm.engine")

CUDA_SHARE = 0.7
CPU_SHARE = 0.5
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4})
_UNITS.update({"kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4})
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """`"8GiB"`, `"512 MiB"`, `"2.5GB"`, `"1000000"` → bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: use bytes or a number with KiB, MiB, GiB (or KB, MB, GB)"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def available_bytes(device: torch.device) -> int:
    """Memory free for the caches' use on `device` now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Elsewhere (macOS): what the system reports as physical pages free.
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_cache_memory(device: torch.device) -> int:
    """The budget used when none is configured (see the module docstring)."""
    share = CUDA_SHARE if device.type == "cuda" else CPU_SHARE
    return int(available_bytes(device) * share)


def block_manager_for(pipe: SonarLLMPipeline, budget: int | None) -> BlockManager:
    """The one page pool for the SONAR-LLM KV cache and the SONAR decoder's cache, sized up
    front from `budget` bytes (None: `default_cache_memory`)."""
    codec, model = pipe.codec, pipe.model
    widths = [model.kv_bytes_per_position(), codec.decoder_stack.bytes_per_position()]
    page = page_bytes_for(widths)
    if budget is None:
        budget = default_cache_memory(model.device)
    blocks = BlockManager.with_capacity(budget, page, model.device)
    log.info(
        "cache memory: %s in %d pages of %s (SONAR-LLM KV cache and SONAR decoder)",
        format_bytes(blocks.capacity_bytes),
        blocks.num_pages,
        format_bytes(page),
    )
    return blocks
