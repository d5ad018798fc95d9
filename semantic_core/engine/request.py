"""A request inside the engine: its phase, and the state each part of the loop keeps for it.

A `Sequence` is made when a request is submitted and lives until its answer is delivered. Its phase
says where it is, and only moves forward (a preempted sequence goes back to WAITING, to resume):

    WAITING -> LOADING (its agent's file is read) -> WAITING -> PREFILL -> DECODE -> FINISHING -> DONE
                                                                     \\-> (DONE: cancelled or failed)

Fields are grouped by who writes them: the scheduler (phase, group, the prompt cursor), admission
(agent, parent, reuse), the runner (the cache while prefilling, tokens in the cache while decoding),
output handling (`output`), and the timing of each stage (`timing`).
"""

from __future__ import annotations

import enum
import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from semantic_core.engine.types import GenerationRequest

if TYPE_CHECKING:
    from semantic_core.engine.handle import RequestHandle
    from semantic_core.engine.output import TextOutput


class Phase(enum.Enum):
    WAITING = "waiting"  # in the queue, agent not ready yet
    LOADING = "loading"  # its agent's file (or the one whose cache it reuses) is being read
    PREFILL = "prefill"  # prompt tokens being computed, a chunk per step
    DECODE = "decode"  # in a decode group, one token per step
    FINISHING = "finishing"  # answer complete, its turn being made durable
    DONE = "done"  # the caller has its final event


@dataclass
class Timing:
    submitted: float
    admitted: float | None = None
    first_token: float | None = None
    prefill_seconds: float = 0.0


@dataclass
class PendingLoad:
    """A read of an agent's file on the reader thread, for this sequence."""

    future: Future[Any]
    agent_id: str


_ids = itertools.count()


@dataclass
class Sequence:
    handle: RequestHandle
    request: GenerationRequest
    timing: Timing
    id: int = field(default_factory=lambda: next(_ids))
    phase: Phase = Phase.WAITING
    # Admission
    agent_id: str | None = None
    parent_id: str | None = None  # without an agent id: the agent whose cache this one reuses
    created_agent: bool = False
    load: PendingLoad | None = None
    cached: int = 0  # prompt tokens reused from the cache at admission
    # When the agent's cache held tokens this prompt does not continue: how many it held (the
    # prompt diverged from them at `cached`), for the client to see why a turn missed the cache.
    diverged_from: int | None = None
    preempted: bool = False  # resumes from its own file: its prompt is every token so far
    # Prefill and decode
    prompt: list[int] = field(default_factory=list)  # the tokens its cache must hold before decoding
    cursor: int = 0  # prompt tokens in the cache so far
    kv: list[Any] | None = None  # the cache while prefilling (the decode group holds it after)
    group: int | None = None  # decode group id
    cache_tokens: int = 0  # tokens in the cache while decoding
    generated: list[int] = field(default_factory=list)
    max_tokens: int = 0
    # Output
    output: TextOutput | None = None
    # Usage, as first admitted (a resumed sequence keeps them)
    prompt_tokens: int = 0
    reused_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            self.prompt = list(self.request.tokens)

    @property
    def remaining_prompt(self) -> int:
        """Prompt tokens still to compute before the last one, which the first decode step feeds."""
        return max(len(self.prompt) - 1 - self.cursor, 0)

    @property
    def running(self) -> bool:
        return self.phase in (Phase.PREFILL, Phase.DECODE)
