"""`LLM`: the engine without a server, driven in the caller's thread (nano-vllm's `LLM` over
`LLMEngine`).

It never starts the engine's thread: each call feeds requests in as the queue has room (so any
number of them runs within the cache memory budget), calls `Engine.step()` until they are done,
and hands back the events the engine emitted. `sonar-llm generate`, `sonar-llm batch`, the tests
and scripts all run through it, so offline answers are the server's answers.

    llm = LLM.from_settings(Settings(model="raxtemur/sonar-llm-900m"))
    for final in llm.generate(["The cat sat on the mat. It was happy."], GenerationOptions()):
        print(final.sentences, final.finish_reason)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.options import GenerationError, GenerationOptions, Prompt
from models.pipeline import SonarLLMPipeline
from server.engine.engine import Engine, EngineConfig, EngineOverloaded
from server.engine.request import (
    DecodeRequest,
    EmbedRequest,
    Event,
    FinalEvent,
    GenerationRequest,
    Request,
    SentenceEvent,
    Work,
)

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("sonar_llm.llm")


@dataclass(frozen=True)
class Output:
    """One request's outcome: its sentences as they were emitted and its final event, or
    `error` when the engine refused it before it ran (a GenerationError naming the field)."""

    index: int  # the request's position in what was passed in
    sentences: list[SentenceEvent]
    final: FinalEvent | None
    error: GenerationError | None = None


class LLM:
    """Offline generation through the batching engine (one caller at a time)."""

    def __init__(self, pipe: SonarLLMPipeline, config: EngineConfig | None = None) -> None:
        self.engine = Engine(pipe, config)

    @classmethod
    def from_settings(
        cls, settings: Settings, progress: Callable[[str], None] | None = None
    ) -> LLM:
        """Load the model the settings name; the engine's limits come from them too."""
        from server.settings import engine_config

        pipe = SonarLLMPipeline.from_options(settings, progress=progress)
        return cls(pipe, engine_config(settings))

    @property
    def pipe(self) -> SonarLLMPipeline:
        return self.engine.pipe

    def generate(
        self, prompts: Iterable[Prompt], options: GenerationOptions | None = None
    ) -> list[FinalEvent]:
        """Each prompt's final event (sentences, finish reason, usage), in the prompts' order.
        A prompt the engine refuses raises its GenerationError."""
        opts = options or GenerationOptions()
        requests = [GenerationRequest(p, opts) for p in prompts]
        finals: list[FinalEvent | None] = [None] * len(requests)
        for out in self.run(requests):
            if out.error is not None:
                raise out.error
            finals[out.index] = out.final
        return [f for f in finals if f is not None]

    def stream(
        self, request: Request | Prompt, options: GenerationOptions | None = None
    ) -> Iterator[SentenceEvent | FinalEvent]:
        """One request's events as they come: each sentence, then the final event. A prompt
        (with `options`) stands for a GenerationRequest; a refused one raises GenerationError."""
        if not isinstance(request, GenerationRequest | EmbedRequest | DecodeRequest):
            request = GenerationRequest(request, options or GenerationOptions())
        for _, event in self.events([request]):
            if isinstance(event, GenerationError):
                raise event
            yield event

    def run(self, requests: Iterable[Request]) -> Iterator[Output]:
        """Every request's `Output`, in the order they finish; a refused request gets its own
        error and the others go on. `requests` is read lazily, as the queue has room."""
        sentences: dict[int, list[SentenceEvent]] = {}
        for index, event in self.events(requests):
            if isinstance(event, SentenceEvent):
                sentences.setdefault(index, []).append(event)
            elif isinstance(event, FinalEvent):
                yield Output(index, sentences.pop(index, []), event)
            else:
                yield Output(index, [], None, event)

    def events(self, requests: Iterable[Request]) -> Iterator[tuple[int, Event | GenerationError]]:
        """Each event the engine emits, with its request's index, as it comes (a refused
        request's GenerationError in place of its events). Leaving early cancels the rest."""
        engine = self.engine
        pending = enumerate(requests)
        inbox: deque[tuple[int, Event]] = deque()
        running: dict[int, Work] = {}
        more = True
        # As many as run at once: what waits in the queue is already on its deadline's clock,
        # and whatever finishes in a step is replaced before the next one admits.
        room = engine.config.max_running
        try:
            while True:
                while more and len(running) < room:
                    item = next(pending, None)
                    if item is None:
                        more = False
                        break
                    refused = self._add(*item, inbox, running)
                    if refused is not None:
                        yield item[0], refused
                while inbox:
                    yield inbox.popleft()
                if not running:
                    if not more:
                        return
                    continue
                engine.step()
        finally:
            self._abandon(list(running.values()))

    def _add(
        self,
        index: int,
        request: Request,
        inbox: deque[tuple[int, Event]],
        running: dict[int, Work],
    ) -> GenerationError | None:
        """Prepare and queue one request (stepping while the queue is full); its error when
        the engine refuses it."""
        try:
            work = self.engine.prepare(request)
        except GenerationError as e:
            return e

        def emit(event: Event) -> None:
            inbox.append((index, event))
            if isinstance(event, FinalEvent):
                running.pop(index, None)

        work.emit = emit
        while True:
            try:
                self.engine.add([work])
            except GenerationError as e:
                return e
            except EngineOverloaded:
                if not self.engine.has_work:
                    raise
                self.engine.step()  # what finishes makes room
                continue
            running[index] = work
            return None

    def _abandon(self, works: list[Work]) -> None:
        """Cancel what a caller left behind and step until it is gone, so the engine is idle
        for the next call (its events go nowhere)."""
        if not works:
            return
        for work in works:
            self.engine.cancel(work)
        try:
            while self.engine.has_work:
                self.engine.step()
        except Exception:  # the loop itself failed: the caller sees the first error
            log.exception("could not cancel the requests left running")
