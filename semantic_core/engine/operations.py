"""Agent operations: create, list, get, save, evict, load, pin, rename, delete, fork.

Each public method runs its work on the engine thread between two generation steps (through the
engine's `call`), because every one of them may touch MLX arrays or the pool. They use the engine's
parts explicitly: the store (records, files), residency (hot caches, blocks), admission (which
agents are claimed or being loaded) and the KV adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from semantic_core.agents.agent import Agent
from semantic_core.agents.record import Sampling
from semantic_core.agents.store import AgentStore
from semantic_core.engine.admission import Admission
from semantic_core.engine.residency import Residency
from semantic_core.engine.snapshot import AgentInfo, agent_info
from semantic_core.errors import (
    AgentBusy,
    AgentDamaged,
    AgentNotFound,
    InvalidRequest,
    ModelMismatch,
    SemanticError,
)
from semantic_core.model import kv
from semantic_core.observability import get_logger

log = get_logger("semantic.engine")
T = TypeVar("T")


class AgentOperations:
    def __init__(
        self,
        *,
        call: Callable[[Callable[[], Any]], Any],
        store: AgentStore,
        residency: Residency,
        admission: Admission,
        new_cache: Callable[[], kv.Cache],
        bytes_per_token: int,
        running_tokens: Callable[[str], int],
    ) -> None:
        self._call = call
        self.store = store
        self.residency = residency
        self.admission = admission
        self.new_cache = new_cache
        self.bytes_per_token = bytes_per_token
        self.running_tokens = running_tokens

    def info(self, agent: Agent) -> AgentInfo:
        return agent_info(agent, self.residency, self.bytes_per_token, self.running_tokens(agent.id))

    def _busy(self, agent: Agent, action: str) -> None:
        if self.residency.is_running(agent.id) or agent.id in self.admission.busy():
            raise AgentBusy(agent.id, action)

    # Operations ------------------------------------------------------------------------------------

    def create(
        self,
        agent_id: str | None = None,
        *,
        display_name: str | None = None,
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
    ) -> AgentInfo:
        def op() -> AgentInfo:
            self.residency.make_hot_slot(self.admission.busy())
            agent = self.admission.new_agent(
                agent_id, set(), display_name=display_name, system_prompt=system_prompt, sampling=sampling
            )
            agent.changed()
            try:
                self.store.save(agent, None)  # an empty agent is still an agent after a restart
            except Exception:
                self.store.unregister(agent)  # all or nothing: no agent that exists only in memory
                raise
            self.residency.place(agent, self.new_cache())
            return self.info(agent)

        return self._run(op)

    def all(self) -> list[AgentInfo]:
        return self._run(lambda: [self.info(a) for a in sorted(self.store, key=lambda a: a.id)])

    def get(self, agent_id: str) -> tuple[AgentInfo, list[dict[str, Any]]]:
        def op() -> tuple[AgentInfo, list[dict[str, Any]]]:
            if not self.store.fresh(agent_id):
                self.store.reread(agent_id)  # in a cluster: read what its files say now, without owning it
            agent = self.store.get(agent_id)
            return self.info(agent), [dict(m) for m in self.store.load_messages(agent)]

        return self._run(op)

    def save(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self._own(agent_id)
            if self.residency.is_running(agent.id):
                raise AgentBusy(agent_id, "save")
            if self.residency.is_hot(agent.id):
                self.store.save(agent, self.residency.cache(agent.id))
            else:
                self.store.release_if_cold(agent)
            return self.info(agent)

        return self._run(op)

    def evict(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self._own(agent_id)
            if self.residency.is_running(agent.id):
                raise AgentBusy(agent_id, "evict")
            self.residency.evict(agent, reason="manual")
            self.store.release_if_cold(agent)
            return self.info(agent)

        return self._run(op)

    def load(self, agent_id: str) -> AgentInfo:
        def op() -> AgentInfo:
            agent = self._own(agent_id)
            self.make_hot(agent)
            return self.info(agent)

        return self._run(op)

    def pin(self, agent_id: str, pinned: bool = True) -> AgentInfo:
        def op() -> AgentInfo:
            self._own(agent_id)
            agent = self.store.set_pinned(agent_id, pinned)
            if pinned:
                self.make_hot(agent)  # pinning keeps it hot, so it starts hot
            self._after_record_change(agent)
            return self.info(agent)

        return self._run(op)

    def rename(self, agent_id: str, display_name: str | None) -> AgentInfo:
        def op() -> AgentInfo:
            self._own(agent_id)
            agent = self.store.rename(agent_id, display_name)
            self._after_record_change(agent)
            return self.info(agent)

        return self._run(op)

    def delete(self, agent_id: str) -> None:
        def op() -> None:
            agent = self._own(agent_id)
            self._busy(agent, "delete")
            self.store.forget(agent)  # raises, changing nothing, if its files cannot be removed
            self.residency.release(agent.id)

        self._run(op)

    def fork(self, agent_id: str, new_id: str | None = None, *, display_name: str | None = None) -> AgentInfo:
        def op() -> AgentInfo:
            parent = self._own(agent_id)
            if self.residency.is_running(parent.id):
                raise AgentBusy(agent_id, "fork")
            self.make_hot(parent)
            self.residency.make_hot_slot({parent.id, *self.admission.busy()})
            child = self.admission.new_agent(
                new_id,
                {parent.id},
                display_name=display_name,
                system_prompt=parent.record.system_prompt,
                sampling=parent.record.sampling,
                forked_from=parent.id,
            )
            length = len(parent.tokens)
            shared = kv.fork(self.residency.cache(parent.id), length)
            try:
                if shared is None:  # a whole cache always forks; a partial one may not (sliding windows)
                    raise SemanticError(f"the cache of agent {agent_id!r} cannot be forked")
                self.residency.place(child, shared)
                self.residency.fork_blocks(parent, child, length)
            except SemanticError:
                self.residency.release(child.id)
                self.store.unregister(child)
                raise
            self.store.set_tokens(child, list(parent.tokens))
            child.record.messages = [dict(m) for m in parent.record.messages]
            child.changed()
            self.save_quietly(child)
            return self.info(child)

        return self._run(op)

    def rehome(self, agent_id: str) -> AgentInfo:
        """Move an agent saved with another model to the loaded one: its conversation is kept, its
        old cache (useless to this model) dropped; its next turn computes the conversation here.
        Written at once, so the move survives a restart."""

        def op() -> AgentInfo:
            agent = self._own(agent_id)
            if agent.damaged:
                raise AgentDamaged(f"agent {agent.id!r} is damaged: {agent.damaged}")
            if agent.compatible:
                raise InvalidRequest(f"agent {agent.id!r} already belongs to the loaded model")
            self.store.rehome(agent)
            return self.info(agent)

        return self._run(op)

    def release(self, agent_id: str) -> None:
        """In a cluster: hand the agent over to another instance that asked for it (its files are
        written, its cache leaves memory, its lock is released). Idempotent."""
        if self.store.ownership is None:
            raise InvalidRequest("this instance is not part of a cluster (SEMANTIC_CLUSTER_INSTANCE is unset)")

        def op() -> None:
            agent = self.store._agents.get(agent_id)
            if agent_id in self.admission.busy() or self.residency.is_running(agent_id):
                raise AgentBusy(agent_id, "hand over")
            assert self.store.ownership is not None
            if not self.store.ownership.holds(agent_id):
                return  # not ours (any more): asked twice, or never held
            if agent is not None and self.residency.is_hot(agent_id):
                self.residency.evict(agent, reason="handoff")
            self.store.hand_over(agent_id)
            self.store.metrics.handoffs.labels("released").inc()
            log.info("agent handed over to another instance", agent=agent_id)

        self._run(op)

    # Shared steps ------------------------------------------------------------------------------------

    def _own(self, agent_id: str) -> Agent:
        """The agent, owned by this instance (in a cluster: taken, seen as its files say)."""
        if self.store.take(agent_id) is None and agent_id not in self.store:
            raise AgentNotFound(agent_id)
        return self.store.get(agent_id)

    def _run(self, op: Callable[[], T]) -> T:
        result: T = self._call(op)
        return result

    def make_hot(self, agent: Agent) -> None:
        """Load an agent into memory now (engine thread; waits for the read)."""
        if self.residency.is_hot(agent.id):
            agent.touch()
            return
        if agent.damaged:
            raise AgentDamaged(f"agent {agent.id!r} is damaged: {agent.damaged}")
        if not agent.compatible:
            raise ModelMismatch(agent.mismatch or f"agent {agent.id!r} was saved with another model")
        protect = {agent.id, *self.admission.busy()}
        self.residency.make_hot_slot(protect)
        if agent.on_disk and agent.tokens:
            fut = self.store.read_async(agent)
            fut.exception()  # wait: explicit loads are synchronous for their caller
            self.residency.place(agent, [])
            try:
                if fut.exception() is None:
                    self.residency.ensure(agent, len(fut.result()[0].tokens), protect=protect)
                cache = self.store.finish_load(agent, fut)
            except SemanticError:
                self.residency.release(agent.id)
                raise
            self.residency.place(agent, cache if cache is not None else self.new_cache())
        else:
            self.store.restore_messages(agent)
            self.residency.place(agent, self.new_cache())
            if agent.tokens:
                self.store.set_tokens(agent, [])
        agent.touch()

    def _after_record_change(self, agent: Agent) -> None:
        """A record changed (name, pin): write it. A cold agent's file is rewritten through a load
        (one file per agent keeps the format simple)."""
        if self.residency.is_hot(agent.id):
            if not self.residency.is_running(agent.id):
                self.save_quietly(agent)
            return
        if agent.damaged or not agent.compatible or not agent.on_disk:
            return
        self.make_hot(agent)
        agent.changed()
        self.store.save(agent, self.residency.cache(agent.id))
        if not agent.record.pinned:
            self.residency.evict(agent, reason="manual")

    def save_quietly(self, agent: Agent) -> None:
        hot = self.residency.get(agent.id)
        if hot is None or hot.running or hot.cache is None:
            return
        try:
            self.store.save_async(agent, hot.cache)
        except SemanticError as exc:
            log.error("could not start saving an agent", agent=agent.id, error=str(exc))
