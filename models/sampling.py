"""Token sampling for rows of the batched SONAR decoder step (`models.decode_batch.DecodeBatch`).

A sampled sentence is one row of the decode batch. Each step, every sampled row draws its next
token from softmax(log-probabilities / temperature), PAD excluded, cut to its `top_k` most likely
tokens and to the smallest set of most likely tokens whose probability reaches `top_p` (nucleus).
The draw is an inverse-CDF lookup of one uniform number per row over the row's tokens sorted by
probability (a stable sort: ties keep token order). The uniform numbers come from a generator of
the row's own, seeded by the request: what a seeded row draws depends on its seed and its own
probabilities only, never on the rows decoded beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How a row samples: `temperature` > 0; `top_p` in (0, 1] and `top_k` >= 1 when given;
    `seed` makes the row reproducible (None: fresh entropy)."""

    temperature: float
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")


class RowSampler:
    """One row's sampling settings and its private stream of uniform numbers (host-side)."""

    def __init__(self, s: Sampling) -> None:
        s.check()
        self.settings = s
        self._rng = np.random.default_rng(None if s.seed is None else s.seed % 2**64)

    def uniform(self) -> float:
        """The next number in [0, 1) of this row's stream (one per sampled token)."""
        return float(self._rng.random())


def draw_params(samplers: list[RowSampler], vocab: int) -> np.ndarray:
    """[4, S] float64: per sampled row its next uniform number, temperature, top-p (2 for
    none: a bound no cumulative probability reaches) and top-k (the vocabulary for none)."""
    out = np.empty((4, len(samplers)), dtype=np.float64)
    for i, r in enumerate(samplers):
        s = r.settings
        out[0, i] = r.uniform()
        out[1, i] = s.temperature
        out[2, i] = 2.0 if s.top_p is None else s.top_p
        out[3, i] = vocab if s.top_k is None else min(s.top_k, vocab)
    return out


def sample_tokens(lprobs: Tensor, params: Tensor) -> Tensor:
    """Tokens [S] drawn from log-probabilities `lprobs` [S, V] (fp32; banned tokens -inf)
    with `params` [4, S] from `draw_params` (on `lprobs`' device)."""
    u, temperature, top_p, top_k = params
    probs = torch.softmax(lprobs / temperature.to(lprobs.dtype)[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    cum = sorted_p.cumsum(dim=-1)
    col = torch.arange(probs.shape[1], device=probs.device)
    keep = col[None, :] < top_k[:, None]
    # The nucleus: tokens whose predecessors' mass is still within top_p of the total (the
    # first token always qualifies).
    keep &= (cum - sorted_p) <= (top_p[:, None] * cum[:, -1:]).to(cum.dtype)
    cdf = torch.where(keep, sorted_p, 0).double().cumsum(dim=-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
    return order.gather(1, at.clamp_(max=probs.shape[1] - 1)).squeeze(1)


def draw(lprobs: Tensor, rows: Tensor, samplers: list[RowSampler]) -> Tensor:
    """One token for each of `rows` of `lprobs` [N, V], row i drawn by `samplers[i]`."""
    params = torch.from_numpy(draw_params(samplers, lprobs.shape[1])).to(lprobs.device)
    return sample_tokens(lprobs[rows], params)
