"""Keeping hot agents inside the budget: the block pool and the agent store together.

- An agent holds pool blocks for the tokens its cache holds (and a running one, for the token the next
  step writes). Nothing becomes hot without its blocks.
- When blocks or hot slots (SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY) run short, the least recently used
  idle, unpinned agent is evicted: saved if its file is stale, then released. A running agent is
  never evicted here (the engine may preempt one, through the same save).
- A fork shares its parent's full prefix blocks (reference counted) until its cache is copied into
  the decode batch, when the shared blocks become its own (copy on write).

Engine thread only.
"""

from __future__ import annotations

from collections.abc import Iterable

from semantic_core.agents.store import Agent, AgentStore
from semantic_core.engine.block_pool import BlockPool
from semantic_core.errors import PoolExhausted, StorageError
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.memory")


class MemoryManager:
    def __init__(self, pool: BlockPool, store: AgentStore, max_hot: int, metrics: Metrics) -> None:
        self.metrics = metrics
        self.pool = pool
        self.store = store
        self.max_hot = max_hot
        self.evictions = 0

    # Queries -------------------------------------------------------------------------------------

    def capacity_tokens(self) -> int:
        return self.pool.capacity * self.pool.block_tokens

    def fits_ever(self, tokens: int) -> bool:
        return self.pool.blocks_for(tokens) <= self.pool.capacity

    def evictable(self, protect: Iterable[str] = ()) -> list[Agent]:
        """Idle, unpinned hot agents, least recently used first."""
        protected = set(protect)
        idle = [
            a for a in self.store.hot_agents()
            if not a.running and not a.record.pinned and a.id not in protected
        ]
        return sorted(idle, key=lambda a: a.last_access)

    def can_serve(self) -> bool:
        """False when the pool is full and nothing can be evicted (readiness probe)."""
        return self.pool.free > 0 or bool(self.evictable())

    # Blocks --------------------------------------------------------------------------------------

    def ensure(self, agent: Agent, tokens: int, protect: Iterable[str] = ()) -> None:
        """Make `agent` hold blocks for `tokens` tokens, evicting others if needed."""
        need = self.pool.blocks_for(tokens) - len(agent.blocks)
        if need <= 0:
            return
        self.make_room(need, protect={agent.id, *protect})
        agent.blocks.extend(self.pool.allocate(agent.id, need))

    def shrink(self, agent: Agent, tokens: int) -> None:
        keep = self.pool.blocks_for(tokens)
        if len(agent.blocks) > keep:
            extra = agent.blocks[keep:]
            del agent.blocks[keep:]
            self.pool.release(agent.id, extra)
        agent.shared_blocks = min(agent.shared_blocks, keep)

    def release(self, agent: Agent) -> None:
        if agent.blocks:
            self.pool.release(agent.id, agent.blocks)
        agent.blocks = []
        agent.shared_blocks = 0

    def make_room(self, blocks: int, protect: Iterable[str] = ()) -> None:
        protected = set(protect)
        while self.pool.free < blocks:
            victims = self.evictable(protected)
            if not victims:
                raise PoolExhausted(
                    f"the KV pool is full: {blocks} blocks needed, {self.pool.free} free of "
                    f"{self.pool.capacity}, and every hot agent is generating or pinned"
                )
            victim = victims[0]
            try:
                self.evict(victim, reason="pool")
            except StorageError as exc:
                log.error("eviction skipped: the agent could not be saved", agent=victim.id, error=str(exc))
                protected.add(victim.id)

    def make_hot_slot(self, protect: Iterable[str] = ()) -> None:
        """Room for one more hot agent under SEMANTIC_AGENT_MAX_AGENTS_IN_MEMORY."""
        protected = set(protect)
        while len(self.store.hot_agents()) >= self.max_hot:
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
        if agent.running:
            raise ValueError(f"agent {agent.id!r} is generating and cannot be evicted")
        if agent.cache is None:
            return
        if agent.dirty or agent.pending_save is not None:
            self.store.save(agent)
        self.release(agent)
        agent.cache = None
        self.store._drop_messages(agent)
        self.evictions += 1
        self.metrics.evictions.labels(reason).inc()
        log.info("agent evicted", agent=agent.id, reason=reason, tokens=len(agent.tokens))

    # Forks ---------------------------------------------------------------------------------------

    def fork_blocks(self, parent: Agent, child: Agent, length: int) -> None:
        """Give `child` the blocks for `length` tokens: the parent's full ones shared, a partial
        last block its own."""
        shared = min(length // self.pool.block_tokens, len(parent.blocks))
        if shared:
            self.pool.share(child.id, parent.blocks[:shared])
            child.blocks = list(parent.blocks[:shared])
            child.shared_blocks = shared
        self.ensure(child, length, protect={parent.id})

    def unshare(self, agent: Agent, protect: Iterable[str] = ()) -> None:
        """The agent's cache is about to be copied: its shared blocks become its own."""
        n = agent.shared_blocks
        if not n:
            return
        self.make_room(n, protect={agent.id, *protect})
        fresh = self.pool.allocate(agent.id, n)
        self.pool.release(agent.id, agent.blocks[:n])
        agent.blocks[:n] = fresh
        agent.shared_blocks = 0
