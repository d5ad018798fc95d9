"""The caller's side of one request: events to iterate (sync or async), and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from semantic_core.engine.types import Event, Failed, Finished, GenerationRequest, GenerationResult, Started

if TYPE_CHECKING:
    from semantic_core.engine.engine import Engine


class RequestHandle:
    """The caller's side of one request: iterate events (sync or async), or cancel."""

    _ids = itertools.count(1)

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.id = next(self._ids)
        self.request = request
        self._engine = engine
        self._loop = loop
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self.agent_id: str | None = request.agent_id
        self.result: GenerationResult | None = None
        self.error: Exception | None = None
        self.done = threading.Event()

    def _push(self, event: Event) -> None:
        if isinstance(event, Started):
            self.agent_id = event.agent_id
        elif isinstance(event, Finished):
            self.result = event.result
        elif isinstance(event, Failed):
            self.error = event.error
        if self._async is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._sync.put(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def cancel(self) -> None:
        self._engine._post(("cancel", self))

    def __iter__(self) -> Iterator[Event]:
        if self._async is not None:
            raise TypeError("this handle was made for asyncio: use `async for`")
        while True:
            event = self._sync.get()
            yield event
            if isinstance(event, Finished | Failed):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._async is None:
            raise TypeError("this handle was made without an event loop: use `for`")
        while True:
            event = await self._async.get()
            yield event
            if isinstance(event, Finished | Failed):
                return

    def wait(self) -> GenerationResult:
        """Consume every event (sync handles) and return the result, or raise the error."""
        for _ in self:
            pass
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
