"""The caller's side of one request: events to iterate (sync or async), and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from semantic_core.engine.types import Event, Failed, Finished, GenerationRequest, GenerationResult, Started


class RequestHandle:
    """The caller's side of one request: iterate events (sync or async), or cancel.

    `cancel_fn` asks the engine to cancel (the engine passes its own): the handle knows nothing
    else of the engine."""

    _ids = itertools.count(1)

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop | None,
        cancel_fn: Callable[[RequestHandle], None],
        *,
        listened: bool = True,
    ) -> None:
        self.id = next(self._ids)
        self.request = request
        self._cancel_fn = cancel_fn
        self._loop = loop
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop is not None else None
        self.agent_id: str | None = request.agent_id
        self.result: GenerationResult | None = None
        self.error: Exception | None = None
        self.done = threading.Event()
        # False: nobody reads the events (a follower rank's copy of a request): only the outcome is kept.
        self._listened = listened

    def deliver(self, event: Event) -> None:
        """The engine hands over the next event (any thread)."""
        if isinstance(event, Started):
            self.agent_id = event.agent_id
        elif isinstance(event, Finished):
            self.result = event.result
        elif isinstance(event, Failed):
            self.error = event.error
        if not self._listened:
            pass
        elif self._async is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._sync.put(event)
        if isinstance(event, Finished | Failed):
            self.done.set()

    def cancel(self) -> None:
        self._cancel_fn(self)

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
