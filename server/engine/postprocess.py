"""After the model ran: the stop rules, and the events each item sends.

`postprocess` is where a generated sentence's fate is decided, in the authors' order: the EOS
sentence (cosine similarity of its re-encoding with the EOS embedding), the repetition stop, a
stop string (the sentence ends before it), then the length limit. The deadline and cancellation
end items before the next iteration, in the scheduler (`Scheduler.drop_ended`).

`Outbox` turns outcomes into events (with their usage and metrics) and holds them until the
iteration's state is settled, so a client that sees its final event also sees itself gone from
the running count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from models.generate import cut_at_stop, eos_similarity, repeats_earlier
from models.options import FinishReason
from models.sonar_codec import Decoded
from server.engine.metrics import EngineMetrics
from server.engine.request import Event, FinalEvent, Generation, SentenceEvent, Work
from server.engine.runner import EncodeTask, Runner

log = logging.getLogger("sonar_llm.engine")


@dataclass(frozen=True)
class Verdict:
    """What becomes of a generated sentence: the sentence to emit (None: none, e.g. the EOS
    sentence, or a stop string at its start), and the finish reason (None: go on)."""

    emit: Decoded | None
    finish: FinishReason | None


def postprocess(gen: Generation, decoded: Decoded, embedding: Tensor, eos_sim: float) -> Verdict:
    """The stop rules for `gen`'s next sentence `decoded`, re-encoded as `embedding`, whose
    cosine similarity with the EOS sentence is `eos_sim`."""
    o = gen.options
    if eos_sim >= o.eos_threshold:
        return Verdict(None, "stop")
    if repeats_earlier(embedding, gen.generated, o.repetition_threshold):
        return Verdict(None, "repetition")
    cut = cut_at_stop(decoded.text, o.stop)
    if cut is not None:  # a stop string: the sentence ends before it, and so does all
        return Verdict(replace(decoded, text=cut) if cut else None, "stop")
    return Verdict(decoded, "length" if len(gen.outputs) + 1 >= o.max_sentences else None)


Ending = tuple[Generation, FinishReason, str | None]


def complete(
    ready: list[tuple[Generation, Decoded]],
    runner: Runner,
    eos_embedding: Callable[[str], Tensor],
    outbox: Outbox,
) -> tuple[list[Ending], dict[Generation, Tensor]]:
    """Each ready sentence re-encoded (one call), judged by `postprocess`, and emitted: the
    generations that end (with why), and the embeddings of those that go on."""
    tasks = {g: EncodeTask([d.text], [g.options.target_lang]) for g, d in ready}
    reencoded = runner.encode(tasks)
    ends: list[Ending] = [
        (gen, "error", why.replace("encode", "re-encode", 1))
        for gen, why in reencoded.errors.items()
    ]
    done = [(g, d, reencoded.results[g][0]) for g, d in ready if g in reencoded.results]
    going_on: dict[Generation, Tensor] = {}
    if not done:
        return ends, going_on
    # One similarity computation (one device sync) for all of them.
    eos = torch.stack([eos_embedding(g.options.eos_text) for g, _, _ in done])
    sims = eos_similarity(torch.stack([e for _, _, e in done]), eos).tolist()
    now = time.perf_counter()
    for (gen, d, emb), sim in zip(done, sims, strict=True):
        gen.usage.decoded_tokens += d.num_tokens
        outbox.metrics.decoded_tokens.inc(d.num_tokens)
        verdict = postprocess(gen, d, emb, sim)
        if verdict.emit is not None:
            outbox.sentence(gen, verdict.emit, emb, now)
        if verdict.finish is not None:
            ends.append((gen, verdict.finish, None))
        else:
            going_on[gen] = emb[None]
    return ends, going_on


class Outbox:
    """Events of this iteration, delivered by `flush()`."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._events: list[tuple[Work, Event]] = []

    def sentence(self, gen: Generation, d: Decoded, emb: Tensor, now: float) -> None:
        """`gen` produced sentence `d` (re-encoded as `emb`)."""
        m = self.metrics
        if gen.usage.time_to_first_sentence is None:
            gen.usage.time_to_first_sentence = now - gen.submitted
            m.time_to_first_sentence.observe(gen.usage.time_to_first_sentence)
        elif gen.last_emit is not None:
            m.inter_sentence_latency.observe(now - gen.last_emit)
        gen.last_emit = now
        assert gen.request is not None
        embedding = emb.float().cpu().tolist() if gen.request.return_embeddings else None
        event = SentenceEvent(
            index=len(gen.outputs),
            text=d.text,
            num_tokens=d.num_tokens,
            embedding=embedding,
            elapsed=now - gen.submitted,
        )
        self._events.append((gen, event))
        gen.outputs.append(d.text)
        if gen.options.repetition_threshold is not None:
            gen.generated.append(emb)
        m.sentences.inc()

    def final(
        self,
        work: Work,
        reason: FinishReason,
        error: str | None = None,
        result: Tensor | list[Decoded] | None = None,
    ) -> None:
        """`work` ended (the scheduler already let it go)."""
        is_generation = isinstance(work, Generation)
        outputs = list(work.outputs) if is_generation else []  # type: ignore[attr-defined]
        work.usage.generated_sentences = len(outputs)
        work.usage.total_time = time.perf_counter() - work.submitted
        if is_generation:  # generation requests (SONAR jobs have their route's)
            if reason == "cancelled" and error is None:  # by its client, not by a shutdown
                self.metrics.cancelled.inc()
            if reason == "repetition":
                self.metrics.repetition_stops.inc()
            self.metrics.finished.labels(reason).inc()
        self._events.append((work, FinalEvent(reason, outputs, work.usage, error, result)))

    def flush(self) -> None:
        events, self._events = self._events, []
        for work, event in events:
            try:
                work.emit(event)
            except Exception:  # a broken listener must not take the loop down
                log.exception("could not deliver an event to request %s", work.request_id)
