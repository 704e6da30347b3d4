"""A request's journey through the engine: what was asked, where it stands, what it emits."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from models.generate import FinishReason, GenerationOptions, Prompt, Usage

_ids = itertools.count()


@dataclass(frozen=True)
class GenerationRequest:
    """What a client asks for: a prompt (text, or pre-split sentences) and options."""

    prompt: Prompt
    options: GenerationOptions = field(default_factory=GenerationOptions)
    timeout: float | None = None  # seconds from submission, queue time included
    return_embeddings: bool = False
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class SentenceEvent:
    index: int
    text: str
    num_tokens: int
    embedding: list[float] | None = None
    elapsed: float = 0.0  # seconds since submission


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: FinishReason
    sentences: list[str]
    usage: Usage
    error: str | None = None


Event = SentenceEvent | FinalEvent


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request (owned by the engine thread once submitted)."""

    request: GenerationRequest
    sentences: list[str]  # the prompt, split (with "Begin of text." when configured)
    add_begin: bool
    emit: Callable[[Event], None]
    submitted: float = field(default_factory=time.perf_counter)
    seq_no: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    started: float | None = None
    last_emit: float | None = None
    outputs: list[str] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    hidden: Tensor | None = None  # last hidden state, awaiting projection
    latent_rng: torch.Generator | None = None
    cancel_reason: FinishReason | None = None

    @property
    def options(self) -> GenerationOptions:
        return self.request.options

    @property
    def deadline(self) -> float | None:
        t = self.request.timeout
        return None if t is None else self.submitted + t

    def expired(self, now: float) -> bool:
        d = self.deadline
        return d is not None and now >= d
