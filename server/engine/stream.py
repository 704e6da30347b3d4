"""The asyncio bridge: a work item's events, from the engine thread to the caller's event loop.

`open_stream` gives a prepared item an `EventStream` (its events are handed to the loop
thread-safely); iterating the stream reads them, and closing it before the end cancels the item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from typing import TYPE_CHECKING

from server.engine.request import (
    EngineDead,
    Event,
    FinalEvent,
    Generation,
    SentenceEvent,
    Work,
)

if TYPE_CHECKING:
    from server.engine.engine import Engine

log = logging.getLogger("sonar_llm.engine")


async def submit_all(engine: Engine, works: list[Work]) -> list[EventStream]:
    """`Engine.submit_all`: every prepared item queued at once, with its stream."""
    if not all(isinstance(w, Work) for w in works):
        raise TypeError("Engine.submit takes prepared work: pass engine.prepare(request)")
    streams = [open_stream(engine, work) for work in works]
    if not engine.thread.started:
        raise EngineDead("engine is not running")
    engine.add(works)
    return streams


def open_stream(engine: Engine, work: Work) -> EventStream:
    """`work`'s events, delivered on the running event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        # A RuntimeError means the client's event loop is gone: nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    work.emit = emit
    return EventStream(engine, work, queue)


class LoopThread:
    """The engine's own thread: `step()` while there is work, asleep otherwise."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._thread: threading.Thread | None = None
        self.stopping = False
        self.error: BaseException | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        if self._thread is not None:
            return
        interval = self.engine.config.gil_switch_interval
        if interval is not None and sys.getswitchinterval() > interval:
            # The loop thread runs Python between short tensor ops almost without pause; at
            # CPython's default 5 ms switch interval the event loop beside it (HTTP, SSE,
            # submissions) waits up to 5 ms for each turn. Process-wide, hence only lowered.
            sys.setswitchinterval(interval)
        self._thread = threading.Thread(target=self._run, name="sonar-llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        with self.engine.cond:
            self.stopping = True
            self.engine.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with engine.cond:
                    while not (self.stopping or engine.has_work):
                        engine.cond.wait()
                    if self.stopping:
                        break
                engine.step()
            engine.shutdown(None)
        except BaseException as e:  # the loop itself failed: nothing can be trusted any more
            log.exception("engine loop died")
            self.error = e
            engine.shutdown(e)


class EventStream:
    """One item's events: iterate, or `next(timeout)`; `aclose()` before the end cancels."""

    def __init__(self, engine: Engine, work: Work, queue: asyncio.Queue[Event]) -> None:
        self._engine = engine
        self._work = work
        self._queue = queue
        self._done = False

    @property
    def request_id(self) -> str:
        return self._work.request_id

    @property
    def prompt_sentences(self) -> int:
        return self._work.prompt_length if isinstance(self._work, Generation) else 0

    @property
    def prompt(self) -> list[str]:
        """The prompt's sentences as the model sees them ("Begin of text." first when added;
        given vectors, which have no text, are not listed)."""
        return list(self._work.sentences) if isinstance(self._work, Generation) else []

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        return self._take(await self._queue.get())

    async def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        if self._done:
            raise StopAsyncIteration
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None
        return self._take(event)

    async def collect(self) -> tuple[list[SentenceEvent], FinalEvent]:
        """Every sentence event, then the final event."""
        sentences: list[SentenceEvent] = []
        async for event in self:
            if isinstance(event, FinalEvent):
                return sentences, event
            sentences.append(event)
        raise RuntimeError("event stream ended without a final event")

    async def result(self) -> FinalEvent:
        """Wait for the final event (a job's answer)."""
        return (await self.collect())[1]

    def _take(self, event: Event) -> Event:
        if isinstance(event, FinalEvent):
            self._done = True
        return event

    async def aclose(self) -> None:
        """Cancel the item unless it already finished."""
        if not self._done:
            self._done = True
            self._engine.cancel(self._work)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
