"""Batched incremental beam search for the SONAR text decoder, rows joining and leaving any step.

fairseq2's `BeamSearchSeq2SeqGenerator` (what the reference decodes with) runs one call per batch:
every embedding starts together and the call lasts as long as its longest sentence, and each
step rebuilds batch layouts and attention state in Python. `DecodeBatch` runs the same search
(`models.beam_rules`) over the same decoder weights (`models.decoder_stack`) as a persistent
batch: `add()` puts an embedding in at any step, `step()` advances every row by one token and
returns the sentences that ended. The engine keeps the decoder busy at token level;
`SonarCodec.decode` uses it for one batch.

Sampled sentences (`BeamRequest.sampling`) are rows of the same batch: a beam of one whose
candidate each step is a draw from its row's distribution (`models.sampling`: temperature,
top-k, top-p, PAD never, EOS forced at the length cap as for beams), from a random stream of its
own, so a seeded sentence is the same whatever decodes beside it.

What differs from fairseq2 is mechanics only:

- Self-attention keys and values live in pages of the `models.block_manager.BlockManager`
  (the memory budget the SONAR-LLM's KV cache draws on too), sized up front by the caller, in
  block tables (`models.decoder_stack.DecoderCache`). A beam never holds more than `beam_pages`
  pages, which is what the engine reserves for it.
- A step whose batched forward raises is run again beam by beam; the beams that still raise
  fail alone, as do beams whose log-probabilities come out NaN.
- A prefix of more than two tokens is fed one token per step, where fairseq2 prefills it in one
  chunk (the same arithmetic up to rounding); SONAR's prefix is `</s> __lang__`, one prefill step.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from models.beam_rules import Beam, Chosen, DecodedSeq, HostChoice, Plan, choose, continuing
from models.block_manager import BlockManager, pages_for
from models.decoder_stack import DecoderCache, SonarDecoderStack, matmul_precision, to_device
from models.sampling import RowSampler, Sampling

NO_PAGE = "the decoder's cache has no free page (pages were not reserved)"


@dataclass(frozen=True)
class BeamRequest:
    """One embedding to decode: `max_seq_len` bounds the whole sequence, prefix included."""

    key: Hashable
    embedding: Tensor
    prefix: Sequence[int]  # forced first tokens, e.g. `</s> __lang__`
    beam_size: int
    max_seq_len: int
    # Set: sample each token instead of searching (one row; `beam_size` must be 1).
    sampling: Sampling | None = None


@dataclass
class StepResult:
    finished: list[tuple[Hashable, DecodedSeq]] = field(default_factory=list)
    failed: list[tuple[Hashable, str]] = field(default_factory=list)  # (key, why)


def beam_pages(beam_size: int, max_seq_len: int, block_positions: int) -> int:
    """The most pages one beam search holds at any moment, a step's transients included.

    A row's cache holds at most `max_seq_len - 1` positions (the last token, EOS, is never
    fed back), so a row's block table has at most B = ceil((max_seq_len - 1) / block) pages,
    and a beam has at most `beam_size` rows: `beam_size × B` pages. The step never goes
    above it: (1) the block a row takes at a boundary is one of its B; (2) at the fork the
    rows that do not continue give their pages back first; then d continuing parents keep
    at most B pages each, their children share the full blocks and the first child goes on
    in the parent's last block, and each of the other (at most `beam_size - d`) children
    takes one page for its copy of that block: d × B + (beam_size - d) <= beam_size × B.
    """
    return pages_for(max(max_seq_len - 1, 1), block_positions, rows=beam_size)


def check_request(r: BeamRequest, stack: SonarDecoderStack) -> None:
    """Raise ValueError if `r` cannot be decoded over `stack`."""
    if r.beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    if 2 * r.beam_size > stack.vocab_size:
        raise ValueError("beam_size is too large for the vocabulary")
    if not r.prefix:
        raise ValueError("the prefix must not be empty")
    if len(r.prefix) >= r.max_seq_len:
        raise ValueError(f"max_seq_len {r.max_seq_len} leaves no room after the prefix")
    if r.max_seq_len > stack.max_positions:
        raise ValueError(
            f"max_seq_len {r.max_seq_len} is beyond the decoder's {stack.max_positions}"
        )
    if r.sampling is not None:
        if r.beam_size != 1:
            raise ValueError("a sampled sentence is one row: beam_size must be 1")
        r.sampling.check()


class DecodeBatch:
    """A persistent batch of beam searches over one SONAR decoder; see the module docstring.

    The self-attention cache lives in pages of `pool` (tagged `owner`), a block of
    `block_positions` positions per page; the caller sizes the pool (`beam_pages` per beam).
    Not thread-safe: one owner (the engine thread, or one `decode` call) drives it.

    State by row (the rows of each beam contiguous, beams in order): on the device the token
    each row feeds next and its cumulative score; on the host (NumPy) its block table and its
    tokens so far. `decide_on_host` says where a step applies the search's rules
    (`beam_rules.choose`): None = on the host exactly when the decoder is on the CPU. The
    beams are kept ordered by row count (most first), which `choose` relies on for speed only.
    """

    def __init__(
        self,
        stack: SonarDecoderStack,
        eos_idx: int,
        pad_idx: int | None,
        pool: BlockManager,
        owner: str = "decoder",
        decide_on_host: bool | None = None,
    ) -> None:
        self.stack = stack
        self.eos = eos_idx
        self.pad = pad_idx
        self.device = stack.device
        self.cache = DecoderCache(stack, pool, owner)
        self.decide_on_host = (
            self.device.type == "cpu" if decide_on_host is None else decide_on_host
        )
        self._beams: list[Beam] = []
        self._cross = torch.zeros(
            (0, stack.num_layers, stack.model_dim), device=self.device, dtype=stack.dtype
        )
        self._free_slots: list[int] = []
        self._empty_rows()

    def _empty_rows(self) -> None:
        self._hist = np.zeros((0, 1), dtype=np.int64)  # [rows, positions]: tokens so far
        self._tok = torch.zeros(0, dtype=torch.long, device=self.device)  # fed next
        self._score = torch.zeros(0, dtype=torch.float32, device=self.device)  # cumulative

    @property
    def block_positions(self) -> int:
        """Positions per block (one pool page)."""
        return self.cache.block_positions

    def _idle(self) -> None:
        """An empty batch holds no memory (the pool got its pages back)."""
        self.cache.clear()
        self._cross = self._cross.new_zeros((0, *self._cross.shape[1:]))
        self._free_slots = []
        self._empty_rows()

    # ----- rows ----------------------------------------------------------------------------
    def _row_counts(self) -> np.ndarray:
        return np.fromiter((b.rows for b in self._beams), dtype=np.int64, count=len(self._beams))

    def _lengths(self) -> np.ndarray:
        return np.fromiter((b.length for b in self._beams), np.int64, len(self._beams))

    def _drop(self, gone: set[int]) -> None:
        """Drop the beams at indices `gone` of `_beams`: their rows, pages, slots."""
        if not gone:
            return
        counts = self._row_counts()
        dead = np.repeat(np.array([i in gone for i in range(len(self._beams))]), counts)
        self.cache.release(self.cache.tables[dead])
        for i in gone:
            self._free_slots.append(self._beams[i].slot)
        keep = ~dead
        self.cache.tables = self.cache.tables[keep]
        self._hist = self._hist[keep]
        idx = to_device(np.nonzero(keep)[0], self.device)
        self._tok = self._tok[idx]
        self._score = self._score[idx]
        self._beams = [b for i, b in enumerate(self._beams) if i not in gone]

    # ----- membership ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._beams)

    @property
    def num_rows(self) -> int:
        return sum(b.rows for b in self._beams)

    def members(self) -> list[Hashable]:
        return [b.key for b in self._beams]

    def cache_bytes(self) -> int:
        """Bytes of the pages this batch holds (host-side accounting, no device sync)."""
        return self.cache.bytes()

    def used_bytes(self) -> int:
        """Bytes of the positions its rows hold, a position shared by sibling rows counted once."""
        return self.cache.used_bytes(self._lengths(), self._row_counts())

    def check(self, r: BeamRequest) -> None:
        """Raise ValueError if `r` cannot be decoded by this batch."""
        check_request(r, self.stack)

    @torch.inference_mode()
    def add(self, requests: list[BeamRequest]) -> None:
        """Start decoding each request's embedding after its forced prefix, from the next step
        (its pages are the caller's to reserve: `beam_pages` each)."""
        if not requests:
            return
        for r in requests:
            self.check(r)
        with matmul_precision(self.stack.dtype):
            cross = self.stack.cross_attention(
                torch.stack([r.embedding.reshape(-1) for r in requests])
            )
        slots = self._slots(len(requests))
        self._cross[torch.tensor(slots, dtype=torch.long, device=self.device)] = cross
        for r, slot in zip(requests, slots, strict=True):
            sampler = RowSampler(r.sampling) if r.sampling is not None else None
            self._beams.append(
                Beam(r.key, r.beam_size, r.max_seq_len, list(r.prefix), slot, sampler=sampler)
            )
        # One new row per request, holding its first prefix token.
        n = len(requests)
        longest = max(r.max_seq_len for r in requests)
        self.cache.add_rows(n, longest)
        wider = max(longest - self._hist.shape[1], 0)
        self._hist = np.pad(self._hist, ((0, n), (0, wider)))
        first = np.array([r.prefix[0] for r in requests], dtype=np.int64)
        self._hist[-n:, 0] = first
        self._tok = torch.cat([self._tok, to_device(first, self.device)])
        self._score = torch.cat([self._score, self._score.new_zeros(n)])

    def _slots(self, n: int) -> list[int]:
        """`n` free rows of `_cross` (growing it by doubling)."""
        if len(self._free_slots) < n:
            have = self._cross.shape[0]
            grown = max(have + n - len(self._free_slots), 2 * have, 16)
            cross = self._cross.new_zeros((grown, *self._cross.shape[1:]))
            cross[:have] = self._cross
            self._cross = cross
            self._free_slots += range(grown - 1, have - 1, -1)
        return [self._free_slots.pop() for _ in range(n)]

    @torch.inference_mode()
    def remove(self, keys: set[Hashable]) -> None:
        """Drop the beams of `keys` (cancelled) with their rows and pages."""
        gone = {i for i, b in enumerate(self._beams) if b.key in keys}
        if gone:
            self._drop(gone)
            if not self._beams:
                self._idle()

    # ----- one token for every row ---------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepResult:
        """Advance every row one token: the beams that finished (best hypothesis each), and the
        beams that failed (NaN log-probabilities, a forward that raised, no page to be had),
        dropped with their pages while the others go on.

        The search's decisions are made for all beams at once (`beam_rules.choose`); the host
        keeps its block tables and token lists with NumPy.
        """
        result = StepResult()
        if not self._beams:
            return result
        no_page = np.nonzero(self.cache.new_blocks(self._lengths(), self._row_counts()))[0]
        if no_page.size:
            result.failed += [(self._beams[i].key, NO_PAGE) for i in no_page.tolist()]
            self._drop(set(no_page.tolist()))
        if not self._beams:
            self._idle()
            return result
        plan = Plan.of(self._beams)
        spans = (plan.row0, plan.counts, plan.lengths)  # each beam's rows, if run alone
        lprobs, failed = self.cache.forward(
            self._tok, plan.row_pos, plan.row_slot, self._cross, spans
        )
        chosen, host = choose(lprobs, self._score, plan, self.eos, self.pad, self.decide_on_host)
        self._apply(plan, chosen, host, failed, result)
        if not self._beams:
            self._idle()
        return result

    def _apply(
        self,
        plan: Plan,
        chosen: Chosen,
        host: HostChoice,
        failed: dict[int, str],
        result: StepResult,
    ) -> None:
        """Record hypotheses, finish and fail beams, and lay out the continuing rows (their
        tokens, block tables and device state) from the step's decisions."""
        beams = self._beams
        for i in np.nonzero(host.nan)[0].tolist():
            failed.setdefault(i, "the SONAR decoder produced NaN log-probabilities")
        alive = np.ones(len(beams), dtype=bool)
        alive[list(failed)] = False
        eos = self.eos
        new_hyps = np.nonzero((host.flags == 1) & alive[:, None])
        for i, c in zip(new_hyps[0].tolist(), new_hyps[1].tolist(), strict=True):
            b = beams[i]
            row = int(plan.row0[i] + host.rows[i, c])
            tokens = self._hist[row, len(b.prefix) : b.length].tolist()
            b.hyps.append(DecodedSeq([*tokens, eos], float(host.norm[i, c])))
        for i in sorted(failed):
            result.failed.append((beams[i].key, failed[i]))
        for i in np.nonzero(host.done & alive)[0].tolist():
            b = beams[i]
            # Best first; ties keep the order they were found in (a stable sort).
            b.hyps.sort(key=lambda h: h.score, reverse=True)
            if b.hyps:
                result.finished.append((b.key, b.hyps[0]))
            else:
                result.failed.append((b.key, "the beam search ended without a hypothesis"))
        going = alive & ~host.done
        order, beam_of, cand, parents, tokens = continuing(plan, host, going)
        keep_beams = self.cache.fork(plan.lengths[beam_of], beam_of, parents, going)
        result.failed += [(beams[i].key, NO_PAGE) for i in np.nonzero(going & ~keep_beams)[0]]
        ok = keep_beams[beam_of]
        beam_of, cand, parents, tokens = beam_of[ok], cand[ok], parents[ok], tokens[ok]
        # Host books: token lists follow their parents.
        hist = self._hist[parents]
        hist[np.arange(len(parents)), plan.lengths[beam_of]] = tokens
        self._hist = hist
        sel = to_device(beam_of * host.width + cand, self.device)
        self._tok = chosen.tokens[sel]
        self._score = chosen.scores[sel]
        counts = np.bincount(beam_of, minlength=len(beams))
        kept: list[Beam] = []
        for i in order.tolist():
            b = beams[i]
            if keep_beams[i]:
                b.length += 1
                b.rows = int(counts[i])
                kept.append(b)
            else:
                self._free_slots.append(b.slot)
        self._beams = kept


def decode_all(batch: DecodeBatch, requests: list[BeamRequest]) -> list[DecodedSeq]:
    """Decode `requests` to completion; results in request order (the batch's pool must hold
    their `beam_pages`)."""
    batch.add(requests)
    out: dict[Hashable, DecodedSeq] = {}
    while len(batch):
        result = batch.step()
        if result.failed:
            raise FloatingPointError(result.failed[0][1])
        out.update(result.finished)
    return [out[r.key] for r in requests]
