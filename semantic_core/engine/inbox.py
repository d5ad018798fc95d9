"""The engine's inbox: what other threads hand the engine thread (see engine.py's loop)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from semantic_core.engine.handle import RequestHandle


@dataclass(frozen=True)
class Submit:
    handle: RequestHandle


@dataclass(frozen=True)
class Cancel:
    handle: RequestHandle


@dataclass(frozen=True)
class Call:
    fn: Callable[[], Any]
    future: Future[Any]


@dataclass(frozen=True)
class Stop:
    save: bool


@dataclass(frozen=True)
class Op:
    """An agent operation by name (`AgentOperations.<name>`): in distributed mode every rank runs it."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future[Any] | None


InboxItem = Submit | Cancel | Call | Stop | Op
