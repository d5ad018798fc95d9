"""Agent operations of the engine: create, list, get, save, evict, load, pin, rename, delete, fork.

Each public method runs its work on the engine thread between two generation steps (`Engine.call`),
because every one of them may touch MLX arrays. `Engine` inherits them; they use its store, memory
manager and scheduling state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from semantic_core.agents.record import Sampling
from semantic_core.agents.store import Agent
from semantic_core.engine.snapshot import AgentInfo
from semantic_core.errors import AgentBusy, AgentDamaged, ModelMismatch, SemanticError

if TYPE_CHECKING:
    from semantic_core.agents.store import AgentStore
    from semantic_core.engine.block_pool import BlockPool
    from semantic_core.engine.memory import MemoryManager
    from semantic_core.model.loader import ModelInfo


class AgentOperations:
    store: AgentStore | None
    memory: MemoryManager | None
    pool: BlockPool | None
    info: ModelInfo | None
    _active_agents: dict[str, Any]
    _new_agent: Any
    _loading_agents: Any


    def create_agent(
        self, agent_id: str | None = None, *, display_name: str | None = None, system_prompt: str | None = None,
        sampling: Sampling | None = None,
    ) -> AgentInfo:
        def op() -> AgentInfo:
            assert self.store is not None and self.memory is not None
            self.memory.make_hot_slot(self._active_agents)
            agent = self._new_agent(agent_id, set(), display_name=display_name, system_prompt=system_prompt,
                                    sampling=sampling)
            agent.cache = self._new_cache()
            agent.changed()
            try:
                self.store.save(agent)  # an empty agent is still an agent after a restart
            except Exception:
                self.store.unregister(agent)  # all or nothing: no agent that exists only in memory
                raise
            return self._info(agent)
        return self.call(op)

    def list_agents(self) -> list[AgentInfo]:
        return self.call(lambda: [self._info(a) for a in sorted(self.store, key=lambda a: a.id)])  # type: ignore[arg-type]

    def get_agent(self, agent_id: str) -> tuple[AgentInfo, list[dict[str, Any]]]:
        def op() -> tuple[AgentInfo, list[dict[str, Any]]]:
            agent = self.store.get(agent_id)  # type: ignore[union-attr]
            return self._info(agent), [dict(m) for m in self.store.load_messages(agent)]  # type: ignore[union-attr]
        return self.call(op)

    def save_agent(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self.store.get(agent_id)  # type: ignore[union-attr]
            if agent.running:
                raise AgentBusy(agent_id, "save")
            if agent.hot:
                self.store.save(agent)  # type: ignore[union-attr]
            return self._info(agent)
        return self.call(op)

    def evict_agent(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self.store.get(agent_id)  # type: ignore[union-attr]
            if agent.running:
                raise AgentBusy(agent_id, "evict")
            self.memory.evict(agent, reason="manual")  # type: ignore[union-attr]
            return self._info(agent)
        return self.call(op)

    def load_agent(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            self._make_hot(self.store.get(agent_id))  # type: ignore[union-attr]
            return self._info(self.store.get(agent_id))  # type: ignore[union-attr]
        return self.call(op)

    def pin_agent(self, agent_id: str, pinned: bool = True) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self.store.set_pinned(agent_id, pinned)  # type: ignore[union-attr]
            if pinned:
                self._make_hot(agent)  # pinning keeps it hot, so it starts hot
            self._save_quietly(agent) if agent.hot and not agent.running else None
            if not agent.hot:
                self._rewrite_cold(agent)
            return self._info(agent)
        return self.call(op)

    def rename_agent(self, agent_id: str, display_name: str | None) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self.store.rename(agent_id, display_name)  # type: ignore[union-attr]
            if agent.hot and not agent.running:
                self._save_quietly(agent)
            elif not agent.hot:
                self._rewrite_cold(agent)
            return self._info(agent)
        return self.call(op)

    def delete_agent(self, agent_id: str) -> None:
        def op() -> None:
            agent = self.store.get(agent_id)  # type: ignore[union-attr]
            if agent.running or agent_id in self._active_agents or agent_id in self._loading_agents():
                raise AgentBusy(agent_id, "delete")
            self.memory.release(agent)  # type: ignore[union-attr]
            self.store.forget(agent)  # type: ignore[union-attr]
        self.call(op)

    def fork_agent(self, agent_id: str, new_id: str | None = None, *, display_name: str | None = None) -> AgentInfo:
        def op() -> AgentInfo:
            assert self.store is not None and self.memory is not None
            parent = self.store.get(agent_id)
            if parent.running:
                raise AgentBusy(agent_id, "fork")
            self._make_hot(parent)
            self.memory.make_hot_slot({parent.id, *self._active_agents})
            child = self.store.create(new_id, display_name=display_name, system_prompt=parent.record.system_prompt,
                                      sampling=parent.record.sampling, forked_from=parent.id)
            try:
                self._fork_into(parent, child, len(parent.tokens))
            except SemanticError:
                self.memory.release(child)
                self.store.forget(child)
                raise
            child.record.messages = [dict(m) for m in parent.record.messages]
            child.changed()
            self._save_quietly(child)
            return self._info(child)
        return self.call(op)

    def _make_hot(self, agent: Agent) -> None:
        assert self.store is not None and self.memory is not None
        if agent.hot:
            agent.touch()
            return
        if agent.damaged:
            raise AgentDamaged(f"agent {agent.id!r} is damaged: {agent.damaged}")
        if not agent.compatible:
            raise ModelMismatch(f"agent {agent.id!r} was saved with another model")
        protect = {agent.id, *self._active_agents}
        self.memory.make_hot_slot(protect)
        if agent.on_disk and agent.tokens:
            fut = self.store.read_async(agent)
            fut.exception()  # wait: explicit loads are synchronous for their caller
            if fut.exception() is None:
                self.memory.ensure(agent, len(fut.result()[0].tokens), protect=protect)
            try:
                self.store.finish_load(agent, fut)
            except SemanticError:
                self.memory.release(agent)
                raise
        else:
            agent.cache = self._new_cache()
            agent.tokens = []
        agent.touch()

    def _rewrite_cold(self, agent: Agent) -> None:
        """A cold agent's record changed: load, save, evict (keeps the single-file format simple)."""
        assert self.memory is not None and self.store is not None
        if agent.damaged or not agent.compatible or not agent.on_disk:
            return
        self._make_hot(agent)
        agent.changed()
        self.store.save(agent)
        if not agent.record.pinned:
            self.memory.evict(agent, reason="manual")

    def _info(self, agent: Agent) -> AgentInfo:
        assert self.info is not None and self.pool is not None
        tokens = len(agent.tokens) if not agent.running else max(
            len(agent.tokens), self._running_tokens(agent.id))
        return AgentInfo(
            id=agent.id, name=agent.record.name, tier=agent.tier, pinned=agent.record.pinned,
            running=agent.running, tokens=tokens, blocks=len(agent.blocks), shared_blocks=agent.shared_blocks,
            kv_bytes=tokens * self.info.bytes_per_token if agent.hot else 0, disk_bytes=agent.disk_bytes,
            on_disk=agent.on_disk, dirty=agent.dirty, compatible=agent.compatible, damaged=agent.damaged,
            created_at=agent.record.created_at, last_used=agent.record.last_used,
            messages=agent.message_count, system_prompt=agent.record.system_prompt,
            forked_from=agent.record.forked_from, reused_tokens=agent.reused_tokens,
            computed_tokens=agent.computed_tokens, save_error=agent.save_error,
            temperature=agent.record.sampling.temperature, max_tokens=agent.record.sampling.max_tokens,
        )

    def _running_tokens(self, agent_id: str) -> int:
        seq = self._active_agents.get(agent_id)
        if seq is None:
            return 0
        return seq.cache_tokens if seq.phase == "decode" else seq.cursor
