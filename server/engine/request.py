"""What the engine queues and what it emits: a generation, an `/embed` or a `/decode` job.

Every kind of work shares `Work` (identity, priority, deadline, cancellation, what it reserved),
which is all the scheduler reads; the runner fills in the rest.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.generate import add_latent_noise
from models.options import FinishReason, GenerationOptions, Prompt, Usage
from models.sonar_codec import Decoded, DecodeOptions
from server.engine.runner import DecodeTask
from server.engine.scheduler import Demand, Status

_arrivals = itertools.count()


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for: a prompt (text, or pre-split sentences; and/or SONAR vectors
    that follow it) and options."""

    prompt: Prompt | None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    timeout: float | None = None  # seconds from submission, queue time included
    return_embeddings: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: int = 0  # lower runs first; equal priorities run in arrival order
    # [N, D] SONAR vectors after the text's sentences (a tensor, or a client's rows of floats)
    prompt_embeddings: Tensor | list[list[float]] | None = None
    # A list `prompt` holds a chat's turns, each split into sentences in order (False: the
    # sentences, already split, taken as given).
    turns: bool = False


@dataclass(frozen=True)
class EmbedRequest:
    """SONAR as a service: texts → embeddings."""

    texts: list[str]
    lang: str
    timeout: float | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: int = 0


@dataclass(frozen=True)
class DecodeRequest:
    """SONAR as a service: embeddings [N, D] (a tensor, or a client's rows) → texts."""

    embeddings: Tensor | list[list[float]]
    lang: str
    options: DecodeOptions = field(default_factory=DecodeOptions)
    timeout: float | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: int = 0


@dataclass(frozen=True)
class SentenceEvent:
    index: int
    text: str
    num_tokens: int
    embedding: list[float] | None = None
    elapsed: float = 0.0  # seconds since submission


@dataclass(frozen=True)
class FinalEvent:
    """The last event of every work item. Jobs carry their answer in `result`: the embeddings
    ([N, D] fp32 on the CPU) of an `/embed`, the `Decoded` rows of a `/decode`."""

    finish_reason: FinishReason
    sentences: list[str]
    usage: Usage
    error: str | None = None
    result: Tensor | list[Decoded] | None = None


Event = SentenceEvent | FinalEvent
Request = GenerationRequest | EmbedRequest | DecodeRequest  # what a client asks the engine for


class EngineOverloaded(RuntimeError):
    """The queue is full: the HTTP layer answers 503 with Retry-After."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(f"server overloaded: {reason}")
        self.reason = reason
        self.retry_after = retry_after


class EngineDead(RuntimeError):
    """The scheduling loop is not running (stopped, or crashed)."""


def _drop(_: Event) -> None:
    pass


@dataclass(eq=False)
class Work:
    """The part of every work item the scheduler reads (owned by the engine thread)."""

    request_id: str
    priority: int
    timeout: float | None
    emit: Callable[[Event], None] = _drop
    submitted: float = field(default_factory=time.perf_counter)
    arrival: int = field(default_factory=lambda: next(_arrivals))
    status: Status = Status.WAITING
    cancel_reason: FinishReason | None = None
    demand: Demand = field(default_factory=Demand)  # what it needs (see the scheduler)
    reserved_pages: int = 0  # held in the memory budget until it finishes
    encoded: int = 0  # texts encoded so far (prompt sentences prefilled, /embed texts)
    rows_started: int = 0  # /decode rows handed to the decoder so far
    usage: Usage = field(default_factory=Usage)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout is None else self.submitted + self.timeout

    def expired(self, now: float) -> bool:
        d = self.deadline
        return d is not None and now >= d

    @property
    def finished(self) -> bool:
        """Out of the scheduler's queues; its final event is on its way."""
        return self.status is Status.FINISHED


@dataclass(eq=False)
class Generation(Work):
    """One generation request."""

    request: GenerationRequest | None = None
    sentences: list[str] = field(default_factory=list)  # the prompt, split
    given: Tensor | None = None  # [N, D] fp32 CPU vectors that follow `sentences` (no encoding)
    add_begin: bool = False
    last_emit: float | None = None
    outputs: list[str] = field(default_factory=list)
    generated: list[Tensor] = field(default_factory=list)  # their embeddings (repetition stop)
    hidden: Tensor | None = None  # last hidden state, awaiting projection
    latent_rng: torch.Generator | None = None

    @property
    def options(self) -> GenerationOptions:
        assert self.request is not None
        return self.request.options

    @property
    def prompt_length(self) -> int:
        """Context positions of the prompt: its sentences, then the given vectors."""
        return len(self.sentences) + (0 if self.given is None else int(self.given.shape[0]))

    def prompt_lang(self, index: int) -> str:
        """ "Begin of text." is English whatever the prompt's language (as the pipeline does)."""
        return "eng_Latn" if self.add_begin and index == 0 else self.options.source_lang

    def admitted(self, device: torch.device) -> None:
        self.usage.prompt_sentences = self.prompt_length
        self.latent_rng = self.options.latent_generator(device)

    def next_input(self) -> Tensor:
        """The hidden state the next sentence is predicted from, with its latent noise."""
        assert self.hidden is not None, "every sentence that starts has a hidden state"
        hidden, self.hidden = self.hidden, None
        return add_latent_noise(hidden, self.options.latent_temperature, self.latent_rng)


@dataclass(eq=False)
class EmbedJob(Work):
    texts: list[str] = field(default_factory=list)
    lang: str = "eng_Latn"
    vectors: list[Tensor] = field(default_factory=list)


@dataclass(eq=False)
class DecodeJob(Work):
    embeddings: Tensor | None = None
    lang: str = "eng_Latn"
    options: DecodeOptions = field(default_factory=DecodeOptions)
    results: list[Decoded | None] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return 0 if self.embeddings is None else int(self.embeddings.shape[0])

    @property
    def done_rows(self) -> int:
        return sum(r is not None for r in self.results)

    def task(self, index: int) -> DecodeTask:
        """What the decoder runs for row `index`."""
        assert self.embeddings is not None
        return DecodeTask(self.embeddings[index], self.lang, self.options)

    def record(self, index: int, decoded: Decoded) -> None:
        self.results[index] = decoded
        self.usage.decoded_tokens += decoded.num_tokens


@dataclass(frozen=True)
class DecodeRow:
    """The decoder's key for row `index` of a `/decode` job."""

    job: DecodeJob
    index: int
