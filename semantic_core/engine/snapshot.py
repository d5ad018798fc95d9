"""Read-only views of the engine's state for lists, gauges and probes, published by the engine thread."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AgentInfo:
    """A read-only view of one agent for lists and gauges."""

    id: str
    name: str
    tier: str
    pinned: bool
    running: bool
    tokens: int
    blocks: int
    shared_blocks: int
    kv_bytes: int
    disk_bytes: int
    on_disk: bool
    dirty: bool
    compatible: bool
    damaged: str | None
    created_at: float
    last_used: float
    messages: int
    system_prompt: str | None
    forked_from: str | None
    reused_tokens: int
    computed_tokens: int
    save_error: str | None
    temperature: float | None = None  # the agent's sampling defaults (None: the caller's)
    max_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything the gauges show, published by the engine thread a few times per second."""

    taken_at: float
    agents: tuple[AgentInfo, ...]
    pool_capacity: int
    pool_used: int
    pool_shared: int
    block_tokens: int
    bytes_per_block: int
    hot_agents: int
    max_hot: int
    running: int
    prefilling: int
    waiting: int
    tokens_reused: int
    tokens_computed: int
    prefill_tps: float
    decode_tps: float
    evictions: int
    saves: int
    loads: int
    quarantined: int
    disk_bytes: int
    requests_total: int
    can_serve: bool = True  # False: the pool is full and nothing can be evicted
    block_map: dict[int, tuple[str, ...]] = field(default_factory=dict)  # used blocks only

    @property
    def utilization(self) -> float:
        return self.pool_used / self.pool_capacity if self.pool_capacity else 0.0

    @property
    def cache_hit_ratio(self) -> float:
        total = self.tokens_reused + self.tokens_computed
        return self.tokens_reused / total if total else 0.0


class RateMeter:
    """Tokens per second over a sliding window."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.events: deque[tuple[float, int, float]] = deque()

    def add(self, tokens: int, seconds: float) -> None:
        self.events.append((time.monotonic(), tokens, seconds))

    def value(self) -> float:
        now = time.monotonic()
        while self.events and now - self.events[0][0] > self.window:
            self.events.popleft()
        tokens = sum(e[1] for e in self.events)
        seconds = sum(e[2] for e in self.events)
        return tokens / seconds if seconds > 0 else 0.0
