"""Read-only views of the engine's state for lists, gauges and probes, and their publisher (engine thread)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from semantic_core.observability import Metrics, get_logger

if TYPE_CHECKING:
    from semantic_core.agents.agent import Agent
    from semantic_core.agents.store import AgentStore
    from semantic_core.engine.admission import Admission
    from semantic_core.engine.block_pool import BlockPool
    from semantic_core.engine.residency import Residency
    from semantic_core.engine.scheduler import Scheduler

log = get_logger("semantic.engine")


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
    top_p: float | None = None
    top_k: int | None = None

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


def agent_info(agent: Agent, residency: Residency, bytes_per_token: int, running_tokens: int = 0) -> AgentInfo:
    """The read-only view of one agent (engine thread)."""
    hot = residency.get(agent.id)
    running = hot is not None and hot.running
    tokens = max(len(agent.tokens), running_tokens) if running else len(agent.tokens)
    blocks, shared = residency.blocks(agent.id)
    return AgentInfo(
        id=agent.id,
        name=agent.record.name,
        tier=residency.tier(agent),
        pinned=agent.record.pinned,
        running=running,
        tokens=tokens,
        blocks=blocks,
        shared_blocks=shared,
        kv_bytes=tokens * bytes_per_token if hot is not None else 0,
        disk_bytes=agent.disk_bytes,
        on_disk=agent.on_disk,
        dirty=agent.dirty,
        compatible=agent.compatible,
        damaged=agent.damaged,
        created_at=agent.record.created_at,
        last_used=agent.record.last_used,
        messages=agent.message_count,
        system_prompt=agent.record.system_prompt,
        forked_from=agent.record.forked_from,
        reused_tokens=agent.reused_tokens,
        computed_tokens=agent.computed_tokens,
        save_error=agent.save_error,
        temperature=agent.record.sampling.temperature,
        max_tokens=agent.record.sampling.max_tokens,
        top_p=agent.record.sampling.top_p,
        top_k=agent.record.sampling.top_k,
    )


class Publisher:
    """Builds the engine's snapshot at most every 0.2 s while it generates (at once when idle and
    something changed), updates the gauges from it, and calls the listeners (engine thread)."""

    def __init__(
        self,
        pool: BlockPool,
        store: AgentStore,
        residency: Residency,
        admission: Admission,
        metrics: Metrics,
        bytes_per_token: int,
        running_tokens: Callable[[str], int],
    ) -> None:
        self.pool = pool
        self.store = store
        self.residency = residency
        self.admission = admission
        self.metrics = metrics
        self.bytes_per_token = bytes_per_token
        self.running_tokens = running_tokens
        self.prefill_rate = RateMeter()
        self.decode_rate = RateMeter()
        self.tokens_reused = 0
        self.tokens_computed = 0
        self.latest: EngineSnapshot | None = None
        self.dirty = True
        self._at = 0.0

    def publish(
        self,
        scheduler: Scheduler,
        listeners: list[Callable[[EngineSnapshot], None]],
        *,
        force: bool,
        busy: bool,
        stopping: bool,
        requests_total: int,
    ) -> None:
        now = time.monotonic()
        if not force and (now - self._at < 0.2 if busy else not self.dirty):
            return
        self.dirty = False
        self._at = now
        agents = tuple(
            agent_info(a, self.residency, self.bytes_per_token, self.running_tokens(a.id))
            for a in sorted(self.store, key=lambda a: a.id)
        )
        stats = self.pool.stats()
        prefill_tps, decode_tps = self.prefill_rate.value(), self.decode_rate.value()
        snap = EngineSnapshot(
            taken_at=time.time(),
            agents=agents,
            pool_capacity=stats.capacity,
            pool_used=stats.used,
            pool_shared=stats.shared,
            block_tokens=stats.block_tokens,
            bytes_per_block=stats.bytes_per_block,
            hot_agents=sum(1 for a in agents if a.tier == "hot"),
            max_hot=self.residency.max_hot,
            running=len(scheduler.decoding),
            prefilling=len(scheduler.prefilling),
            waiting=len(scheduler.waiting),
            tokens_reused=self.tokens_reused,
            tokens_computed=self.tokens_computed,
            prefill_tps=prefill_tps,
            decode_tps=decode_tps,
            evictions=self.residency.evictions,
            saves=self.store.saves_total,
            loads=self.store.loads_total,
            quarantined=self.store.quarantined_total,
            disk_bytes=self.store.disk_bytes(),
            requests_total=requests_total,
            can_serve=self.residency.can_serve(),
            block_map=self.pool.block_map(),
        )
        self.latest = snap
        m = self.metrics
        m.pool_utilization.set(snap.utilization)
        m.pool_blocks.labels("used").set(stats.used)
        m.pool_blocks.labels("free").set(stats.free)
        m.pool_blocks.labels("shared").set(stats.shared)
        for tier in ("hot", "cold", "damaged"):
            m.agents.labels(tier).set(sum(1 for a in agents if a.tier == tier))
        m.agents_active.set(len(self.admission.claims))
        m.ready.set(1 if snap.can_serve and not stopping else 0)
        m.batch_size.set(len(scheduler.decoding))
        m.queue_depth.set(len(scheduler.waiting))
        m.tokens_per_second.labels("prefill").set(prefill_tps)
        m.tokens_per_second.labels("decode").set(decode_tps)
        for fn in list(listeners):
            try:
                fn(snap)
            except Exception:  # a listener must never break generation
                log.exception("snapshot listener failed")
