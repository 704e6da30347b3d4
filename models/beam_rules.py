"""fairseq2's beam search rules, as functions of one step's candidates (no batch state).

The search is fairseq2's `BeamSearchSeq2SeqGenerator`, decision for decision
(`tests/models/test_beam_search.py` compares the two): the target prefix (`</s> __lang__`) is
forced and scored, each step takes the best 2 × beam candidates of the flattened beam, finishes
EOS among the first `beam` of them (score normalised by length), continues with the first `beam`
non-EOS, forces EOS at the last position, never emits PAD, and picks the best finished
hypothesis. A sampled sentence is a beam of one whose candidate is a draw from its row's
distribution (`models.sampling`).

`choose` applies the rules to every beam of a step at once, in one of two places its caller
picks (`DecodeBatch(decide_on_host=...)`; by default the host exactly when the decoder is on the
CPU): on the device, bringing back one small array (a GPU's path), or on NumPy views of the
candidates (a CPU's, where the device is the host: a NumPy operation costs a few µs where a
tensor operation on a CPU costs tens). Both run the same `decide` (operators only).

The scores of hypotheses agree with fairseq2's to float rounding, not bit for bit: batched
matrix products round differently with the batch's shape (fairseq2's own do too).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.decoder_stack import to_device
from models.sampling import RowSampler, draw

TOPK_CHUNK = 256  # positions per chunk in `row_topk`


@dataclass
class DecodedSeq:
    """One finished sentence: its tokens (without the prefix, ending with EOS) and score."""

    tokens: list[int]
    score: float


@dataclass
class Beam:
    """One beam search (or sampled sentence) in a batch: what the rules read of it."""

    key: Hashable
    beam_size: int
    max_seq_len: int  # cap on the whole sequence, prefix included (fairseq2's max_seq_len)
    prefix: list[int]
    slot: int  # the row of the batch's cross-attention terms holding this beam's
    # Every row of a beam is at the same position: each has `length` tokens and its cache holds
    # positions 0..length-2 (the last token is fed next). 1 row until the prefix is done.
    length: int = 1
    rows: int = 1
    hyps: list[DecodedSeq] = field(default_factory=list)
    sampler: RowSampler | None = None  # a sampled sentence's settings and random stream


@dataclass
class Plan:
    """One step's layout, from the host's books: the beams' rows, positions, and what the
    device needs to make their decisions."""

    lengths: np.ndarray  # [beams]: tokens each row has (its next position is `length - 1`)
    counts: np.ndarray  # [beams]: rows
    row0: np.ndarray  # [beams]: first row
    row_pos: np.ndarray  # [rows]: the position each row writes
    row_slot: np.ndarray  # [rows]: its beam's cross-attention slot
    beam_size: np.ndarray
    hyps: np.ndarray  # [beams]: hypotheses found so far
    forced: np.ndarray  # [beams]: the forced prefix token, -1 once searching
    last: np.ndarray  # [beams]: at the last position (only EOS may follow)
    widest: int  # the largest beam size
    longest: int  # max(lengths)
    sampled: np.ndarray  # beams that sample this step's token (one row each)
    samplers: list[RowSampler]  # theirs

    @staticmethod
    def of(beams: list[Beam]) -> Plan:
        nb = len(beams)
        lengths = np.fromiter((b.length for b in beams), np.int64, nb)
        counts = np.fromiter((b.rows for b in beams), np.int64, nb)
        beam_size = np.fromiter((b.beam_size for b in beams), np.int64, nb)
        forced = np.fromiter(
            (b.prefix[b.length] if b.length < len(b.prefix) else -1 for b in beams), np.int64, nb
        )
        max_len = np.fromiter((b.max_seq_len for b in beams), np.int64, nb)
        row0 = np.cumsum(counts) - counts
        last = (lengths == max_len - 1) & (forced < 0)
        sampling = np.fromiter((b.sampler is not None for b in beams), bool, nb)
        sampled = np.nonzero(sampling & (forced < 0) & ~last)[0]
        return Plan(
            lengths=lengths,
            counts=counts,
            row0=row0,
            row_pos=np.repeat(lengths - 1, counts),
            row_slot=np.repeat(np.fromiter((b.slot for b in beams), np.int64, nb), counts),
            beam_size=beam_size,
            hyps=np.fromiter((len(b.hyps) for b in beams), np.int64, nb),
            forced=forced,
            last=last,
            widest=int(beam_size.max()),
            longest=int(lengths.max()),
            sampled=sampled,
            samplers=[s for i in sampled.tolist() if (s := beams[i].sampler) is not None],
        )

    @property
    def num_rows(self) -> int:
        return int(self.counts.sum())

    def choose_layout(self) -> Layout:
        """Everything `choose` reads from the host, in one array, and its parts' sizes."""
        last = np.nonzero(np.repeat(self.last, self.counts))[0]
        forced_beam = np.nonzero(self.forced >= 0)[0]
        parts = [
            last,
            forced_beam,
            self.row0[forced_beam],
            self.forced[forced_beam],
        ]
        # Runs of consecutive beams with the same number of rows: (first row, beams, rows each).
        starts = np.flatnonzero(np.diff(self.counts, prepend=-1))
        sizes = np.diff(starts, append=len(self.counts))
        runs = list(
            zip(
                self.row0[starts].tolist(),
                sizes.tolist(),
                self.counts[starts].tolist(),
                strict=True,
            )
        )
        return Layout(np.concatenate(parts), runs=runs, last=last.size, forced=forced_beam.size)


@dataclass
class Layout:
    """`Plan.choose_layout`: the host's indices for `choose` and how many of each kind."""

    indices: np.ndarray
    runs: list[tuple[int, int, int]]  # (first row, beams, rows each) of each run of beams
    last: int  # rows at their last position
    forced: int  # beams in their prefix


@dataclass
class Chosen:
    """The candidates' tokens and cumulative scores ([beams × 2K], on the device) from which
    the continuing rows are gathered."""

    tokens: Tensor
    scores: Tensor


@dataclass
class HostChoice:
    """The step's decisions on the host: per beam and candidate (in top-k order) its token, its
    row in the beam, a flag (1 a new hypothesis, 2 a continuing row) and its length-normalised
    score; per beam whether it is done and whether its log-probabilities had a NaN."""

    tokens: np.ndarray
    rows: np.ndarray
    flags: np.ndarray
    norm: np.ndarray
    done: np.ndarray
    nan: np.ndarray
    width: int

    @staticmethod
    def unpack(a: np.ndarray, plan: Plan) -> HostChoice:
        nb = len(plan.lengths)
        w = 2 * plan.widest
        m = nb * w
        return HostChoice(
            tokens=a[:m].reshape(nb, w).astype(np.int64),
            rows=a[m : 2 * m].reshape(nb, w).astype(np.int64),
            flags=a[2 * m : 3 * m].reshape(nb, w),
            norm=a[3 * m : 4 * m].view(np.float32).reshape(nb, w),
            done=a[4 * m : 4 * m + nb].astype(bool),
            nan=a[4 * m + nb :].astype(bool),
            width=w,
        )


def decide(
    tok: Any,
    score: Any,
    beam_size: Any,
    hyps: Any,
    length: Any,
    in_prefix: Any,
    last: Any,
    col: Any,
    eos: int,
) -> tuple[Any, Any, Any]:
    """fairseq2's rules on each beam's candidates, sorted best first: `tok`/`score` [beams, 2K],
    per beam its size, hypotheses so far, length (float32), whether it is in its prefix or at
    its last position; `col` = arange(2K). NumPy arrays or tensors alike (only operators).

    Among the first `beam` candidates the EOS ones become hypotheses until the beam has
    `beam`; the beam is done when it has them all or is at its last position; the first `beam`
    non-EOS candidates of a beam that is not done continue; a beam in its prefix continues with
    its first candidate (the forced token). Returns per candidate a flag (1 a new hypothesis,
    2 a continuing row), per beam whether it is done, and the length-normalised scores."""
    size = beam_size[:, None]
    searching = ~in_prefix[:, None]
    is_eos = (tok == eos) & (col < size) & searching
    hyp = is_eos & (hyps[:, None] + is_eos.cumsum(1) <= size)
    done = (hyps + is_eos.sum(1) >= beam_size) | last
    other = (tok != eos) & (col < 2 * size) & searching
    cont = other & (other.cumsum(1) <= size) & ~done[:, None]
    cont |= in_prefix[:, None] & (col == 0)
    return 1 * hyp + 2 * cont, done, score / length[:, None]


def row_topk(x: Tensor, k: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=1)` (values sorted, NaN first) for wide rows, at about the cost of one
    `amax` pass: each row's k best lie in its k chunks with the largest maxima (an element
    outside them is beaten by those chunks' maxima), so only those chunks are searched.
    Equal values may come back in another order than a plain top-k's (which does not promise
    one either)."""
    chunk = chunk or TOPK_CHUNK
    n, width = x.shape
    chunks = width // chunk
    if chunks < 4 * k:
        return x.topk(k, dim=1)
    body = x[:, : chunks * chunk].view(n, chunks, chunk).amax(dim=2)
    if width > chunks * chunk:  # the tail is one more (shorter) chunk
        body = torch.cat([body, x[:, chunks * chunk :].amax(dim=1, keepdim=True)], dim=1)
    best = body.topk(k, dim=1).indices  # [n, k] chunks
    cols = (best.unsqueeze(2) * chunk + torch.arange(chunk, device=x.device)).view(n, -1)
    inside = cols < width
    values = x.gather(1, cols.clamp(max=width - 1))
    values = values.masked_fill(~inside, -torch.inf)  # the tail chunk's missing positions
    v, j = values.topk(k, dim=1)
    return v, cols.gather(1, j)


def choose(
    lprobs: Tensor,
    scores: Tensor,
    plan: Plan,
    eos: int,
    pad: int | None,
    on_host: bool,
) -> tuple[Chosen, HostChoice]:
    """fairseq2's decisions for every beam at once, from the rows' log-probabilities `lprobs`
    [rows, V] (fp32, overwritten) and cumulative `scores` [rows].

    As fairseq2 does, each row's cumulative score is added to its log-probabilities and
    each beam takes the best 2 × K candidates (K the largest beam size) of its rows
    flattened: the beams with c rows each take them in one top-k over a [beams, c × V] view
    (the batch keeps its beams ordered by row count, so there is one such run per count).
    A sampled beam's one candidate is its row's draw (PAD banned, before the scores are
    added; `decide` ends it on EOS and otherwise continues it). Rows in
    their prefix take the forced token; rows at the last position may only end (EOS). Which
    rows are in their prefix or at the last position is known on the host, so those cases
    cost nothing in a step that has none. `on_host`: decide on NumPy views (the device is the
    host) rather than on the device with one packed read back."""
    nb = len(plan.lengths)
    lay = plan.choose_layout()
    # One copy to the device: what it needs (and, if it decides, the beams' state).
    if on_host:
        idx = to_device(lay.indices, lprobs.device)
    else:
        idx = to_device(np.concatenate([*_per_beam(plan), lay.indices]), lprobs.device)
    at = 0 if on_host else 5 * nb
    last_t = idx[at : at + lay.last]
    forced_beam, forced_row, forced_tok = idx[at + lay.last :].view(3, -1)

    if pad is not None:
        lprobs.select(1, pad).fill_(-torch.inf)
    sampled = _draws(lprobs, plan)  # before the scores are added in place
    cand = lprobs.add_(scores.unsqueeze(1))  # fairseq2's sums, in fp32
    if lay.last:
        # At the last position only EOS may follow; a NaN anywhere in the row stays seen.
        ends = cand[last_t, eos]
        ends = torch.where(cand[last_t].isnan().any(1), torch.nan, ends)
        cand.index_fill_(0, last_t, -torch.inf)
        cand[last_t, eos] = ends
    forced_val = cand[forced_row, forced_tok] if lay.forced else None
    beam_v, beam_j = _best(cand, lay.runs, 2 * plan.widest)
    vocab = cand.shape[1]
    beam_row = beam_j // vocab
    beam_tok = beam_j - beam_row * vocab
    nan = beam_v[:, 0].isnan()
    if sampled is not None:
        beams_t, rows_t, tok = sampled
        beam_tok[beams_t, 0] = tok
        beam_v[beams_t, 0] = cand[rows_t, tok]
        beam_row[beams_t, 0] = 0
    if forced_val is not None:
        # Prefix rows: the forced token is the one candidate.
        beam_tok[forced_beam, 0] = forced_tok
        beam_v[forced_beam, 0] = forced_val
        beam_row[forced_beam, 0] = 0
    chosen = Chosen(beam_tok.view(-1), beam_v.view(-1))
    if on_host:
        return chosen, _decide_on_host(plan, beam_tok, beam_v, beam_row, nan, eos)
    return chosen, _decide_on_device(plan, idx[: 5 * nb], beam_tok, beam_v, beam_row, nan, eos)


def _draws(lprobs: Tensor, plan: Plan) -> tuple[Tensor, Tensor, Tensor] | None:
    """The sampled beams that draw this step (not in their prefix, not at their last
    position, where the token is forced): their indices, rows and drawn tokens."""
    if not plan.sampled.size:
        return None
    idx = to_device(np.concatenate([plan.sampled, plan.row0[plan.sampled]]), lprobs.device)
    beams_t, rows_t = idx.view(2, -1)
    return beams_t, rows_t, draw(lprobs, rows_t, plan.samplers)


def _per_beam(plan: Plan) -> list[np.ndarray]:
    """What `decide` reads per beam, for the device: size, hypotheses, length, prefix, last."""
    return [plan.beam_size, plan.hyps, plan.lengths, plan.forced >= 0, plan.last]


def _best(cand: Tensor, runs: list[tuple[int, int, int]], k2: int) -> tuple[Tensor, Tensor]:
    """Each beam's best `k2` candidates over its rows flattened: values and flat indices."""
    vocab = cand.shape[1]
    # A run of beams with c rows each is a [beams, c × V] view of the rows: no copy.
    best = [row_topk(cand[r0 : r0 + beams * c].view(beams, c * vocab), k2) for r0, beams, c in runs]
    if len(best) == 1:
        return best[0]
    return torch.cat([v for v, _ in best]), torch.cat([j for _, j in best])


def _decide_on_host(
    plan: Plan, beam_tok: Tensor, beam_v: Tensor, beam_row: Tensor, nan: Tensor, eos: int
) -> HostChoice:
    """`decide` on NumPy views of the candidates (the device is the host)."""
    k2 = beam_tok.shape[1]
    tok_h, v_h = beam_tok.numpy(), beam_v.numpy()
    flags, done, norm = decide(
        tok_h,
        v_h,
        plan.beam_size,
        plan.hyps,
        plan.lengths.astype(np.float32),
        plan.forced >= 0,
        plan.last,
        np.arange(k2),
        eos,
    )
    return HostChoice(
        tokens=tok_h,
        rows=beam_row.numpy(),
        flags=flags,
        norm=norm,
        done=done,
        nan=nan.numpy(),
        width=k2,
    )


def _decide_on_device(
    plan: Plan,
    per_beam: Tensor,
    beam_tok: Tensor,
    beam_v: Tensor,
    beam_row: Tensor,
    nan: Tensor,
    eos: int,
) -> HostChoice:
    """`decide` on the device (`per_beam`: `_per_beam(plan)` there), one packed read back."""
    nb, k2 = beam_tok.shape
    size_t, hyps_t, length_t, prefix_t, last_beam_t = per_beam.view(5, nb)
    flags_t, done_t, norm_t = decide(
        beam_tok,
        beam_v,
        size_t,
        hyps_t,
        length_t.float(),
        prefix_t.bool(),
        last_beam_t.bool(),
        torch.arange(k2, device=beam_tok.device),
        eos,
    )
    packed = torch.cat(
        [
            beam_tok.int().view(-1),
            beam_row.int().view(-1),
            flags_t.int().view(-1),
            norm_t.view(torch.int32).view(-1),
            done_t.int(),
            nan.int(),
        ]
    )
    # The step's one synchronisation: what the host must know to keep its books.
    return HostChoice.unpack(packed.cpu().numpy(), plan)


def continuing(plan: Plan, host: HostChoice, going: np.ndarray) -> tuple[np.ndarray, ...]:
    """The rows that go on: (the beams' new order, each row's beam, candidate, parent row and
    token). The beams are ordered by their rows, most first (a stable sort; the beams that end
    go last), so that the next step's `choose` takes each count's beams in one view."""
    beam_of, cand = np.nonzero((host.flags == 2) & going[:, None])
    order = np.argsort(-np.bincount(beam_of, minlength=len(going)), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    by = np.argsort(rank[beam_of], kind="stable")
    beam_of, cand = beam_of[by], cand[by]
    parents = plan.row0[beam_of] + host.rows[beam_of, cand]
    return order, beam_of, cand, parents, host.tokens[beam_of, cand]
