"""Residency: which agents are hot, their KV arrays, their pool blocks, and keeping all of it inside the
budget. The engine's memory side; the agent store (records and files) knows none of it.

- A hot agent has a cache in memory (`Hot.cache`) and pool blocks for the tokens it holds. While a
  request runs on it the cache is lent to that sequence (prefill) or its decode group, and the agent
  is `running`; `lend` and `settle` are the only places that flip it.
- Nothing becomes hot without its blocks. When blocks or hot slots (SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY)
  run short, the least recently used idle, unpinned agent is evicted: saved if its file is stale,
  then released. A running agent is never evicted here (the engine may preempt one, through the
  same save). An agent that cannot be saved (disk full) stays hot rather than lose its state.
- A fork shares its parent's full prefix blocks (reference counted) until its cache is copied into a
  decode batch, when the shared blocks become its own (copy on write).

Engine thread only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from semantic_core.agents.agent import Agent
from semantic_core.agents.store import AgentStore
from semantic_core.engine.block_pool import BlockPool
from semantic_core.errors import PoolExhausted, StorageError
from semantic_core.model.kv import Cache
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.memory")


@dataclass
class Hot:
    cache: Cache | None  # None while lent to a running sequence
    blocks: list[int] = field(default_factory=list)
    shared_blocks: int = 0  # leading blocks shared with the agent it was forked from
    running: bool = False


class Residency:
    def __init__(self, pool: BlockPool, store: AgentStore, max_hot: int, metrics: Metrics) -> None:
        self.pool = pool
        self.store = store
        self.max_hot = max_hot
        self.metrics = metrics
        self.evictions = 0
        self._hot: dict[str, Hot] = {}

    # Queries -------------------------------------------------------------------------------------

    def is_hot(self, agent_id: str) -> bool:
        return agent_id in self._hot

    def is_running(self, agent_id: str) -> bool:
        hot = self._hot.get(agent_id)
        return hot is not None and hot.running

    def get(self, agent_id: str) -> Hot | None:
        return self._hot.get(agent_id)

    def cache(self, agent_id: str) -> Cache:
        hot = self._hot[agent_id]
        if hot.cache is None:
            raise RuntimeError(f"the cache of agent {agent_id!r} is lent to a running sequence")
        return hot.cache

    def hot_ids(self) -> list[str]:
        return list(self._hot)

    def tier(self, agent: Agent) -> str:
        if agent.damaged:
            return "damaged"
        return "hot" if agent.id in self._hot else "cold"

    def capacity_tokens(self) -> int:
        return self.pool.capacity * self.pool.block_tokens

    def fits_ever(self, tokens: int) -> bool:
        return self.pool.blocks_for(tokens) <= self.pool.capacity

    def evictable(self, protect: Iterable[str] = ()) -> list[Agent]:
        """Idle, unpinned hot agents, least recently used first."""
        protected = set(protect)
        idle = []
        for agent_id, hot in self._hot.items():
            if hot.running or agent_id in protected or agent_id not in self.store:
                continue
            agent = self.store.get(agent_id)
            if not agent.record.pinned:
                idle.append(agent)
        return sorted(idle, key=lambda a: a.last_access)

    def can_serve(self) -> bool:
        """False when the pool is full and nothing can be evicted (readiness probe)."""
        return self.pool.free > 0 or bool(self.evictable())

    # Hot state -----------------------------------------------------------------------------------

    def place(self, agent: Agent, cache: Cache) -> None:
        """Make an agent hot with this cache (blocks are reserved separately, with `ensure`)."""
        hot = self._hot.get(agent.id)
        if hot is None:
            self._hot[agent.id] = Hot(cache)
        else:
            hot.cache = cache

    def lend(self, agent_id: str) -> Cache:
        """A request starts on this agent: its cache goes to the sequence, the agent is running."""
        hot = self._hot[agent_id]
        cache = self.cache(agent_id)
        hot.cache = None
        hot.running = True
        return cache

    def settle(self, agent: Agent, cache: Cache | None, tokens: list[int]) -> None:
        """A request on this agent ended: it holds `cache` (of `tokens`) again, idle."""
        hot = self._hot.get(agent.id)
        if hot is None:
            hot = self._hot[agent.id] = Hot(cache)
        hot.cache, hot.running = cache, False
        self.store.set_tokens(agent, tokens)
        self.shrink(agent, len(tokens))

    def release(self, agent_id: str) -> None:
        """Forget an agent's hot state and give its blocks back (its file is its state now)."""
        hot = self._hot.pop(agent_id, None)
        if hot is not None and hot.blocks:
            self.pool.release(agent_id, hot.blocks)

    # Blocks ---------------------------------------------------------------------------------------

    def blocks(self, agent_id: str) -> tuple[int, int]:
        hot = self._hot.get(agent_id)
        return (len(hot.blocks), hot.shared_blocks) if hot else (0, 0)

    def ensure(self, agent: Agent, tokens: int, protect: Iterable[str] = ()) -> None:
        """Make `agent` (hot) hold blocks for `tokens` tokens, evicting others if needed."""
        hot = self._hot[agent.id]
        need = self.pool.blocks_for(tokens) - len(hot.blocks)
        if need <= 0:
            return
        self.make_room(need, protect={agent.id, *protect})
        hot.blocks.extend(self.pool.allocate(agent.id, need))

    def shrink(self, agent: Agent, tokens: int) -> None:
        hot = self._hot.get(agent.id)
        if hot is None:
            return
        keep = self.pool.blocks_for(tokens)
        if len(hot.blocks) > keep:
            extra = hot.blocks[keep:]
            del hot.blocks[keep:]
            self.pool.release(agent.id, extra)
        hot.shared_blocks = min(hot.shared_blocks, keep)

    def make_room(self, blocks: int, protect: Iterable[str] = ()) -> None:
        protected = set(protect)
        while self.pool.free < blocks:
            victims = self.evictable(protected)
            if not victims:
                raise PoolExhausted(
                    f"the KV pool is full: {blocks} blocks needed, {self.pool.free} free of "
                    f"{self.pool.capacity}, and every hot agent is generating or pinned"
                )
            try:
                self.evict(victims[0], reason="pool")
            except StorageError as exc:
                log.error("eviction skipped: the agent could not be saved", agent=victims[0].id, error=str(exc))
                protected.add(victims[0].id)

    def make_hot_slot(self, protect: Iterable[str] = ()) -> None:
        """Room for one more hot agent under SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY."""
        protected = set(protect)
        while len(self._hot) >= self.max_hot:
            victims = self.evictable(protected)
            if not victims:
                raise PoolExhausted(
                    f"{self.max_hot} agents are in memory (SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY) and "
                    "all of them are generating or pinned"
                )
            try:
                self.evict(victims[0], reason="max_agents")
            except StorageError as exc:
                log.error("eviction skipped: the agent could not be saved", agent=victims[0].id, error=str(exc))
                protected.add(victims[0].id)

    def evict(self, agent: Agent, reason: str = "manual") -> None:
        """Save if stale, then drop the cache from memory. Raises StorageError and keeps the agent hot
        if it cannot be saved."""
        hot = self._hot.get(agent.id)
        if hot is None:
            return
        if hot.running:
            raise ValueError(f"agent {agent.id!r} is generating and cannot be evicted")
        if agent.dirty or self.store.saving(agent.id):
            self.store.save(agent, hot.cache)
        self.release(agent.id)
        self.store.went_cold(agent)
        self.store.release_if_cold(agent)
        self.evictions += 1
        self.metrics.evictions.labels(reason).inc()
        log.info("agent evicted", agent=agent.id, reason=reason, tokens=len(agent.tokens))

    # Forks ---------------------------------------------------------------------------------------

    def fork_blocks(self, parent: Agent, child: Agent, length: int) -> None:
        """Give `child` (hot) the blocks for `length` tokens: the parent's full ones shared, a
        partial last block its own."""
        phot, chot = self._hot[parent.id], self._hot[child.id]
        shared = min(length // self.pool.block_tokens, len(phot.blocks))
        if shared:
            self.pool.share(child.id, phot.blocks[:shared])
            chot.blocks = list(phot.blocks[:shared])
            chot.shared_blocks = shared
        self.ensure(child, length, protect={parent.id})

    def unshare(self, agent: Agent, protect: Iterable[str] = ()) -> None:
        """The agent's cache is about to be copied: its shared blocks become its own."""
        hot = self._hot[agent.id]
        n = hot.shared_blocks
        if not n:
            return
        self.make_room(n, protect={agent.id, *protect})
        fresh = self.pool.allocate(agent.id, n)
        self.pool.release(agent.id, hot.blocks[:n])
        hot.blocks[:n] = fresh
        hot.shared_blocks = 0
