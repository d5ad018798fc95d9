"""Admission: getting a waiting sequence ready to prefill.

For the scheduler's `prepare` step: carry out the routing decision (`agents/routing.py`) for the
sequence's agent, make that agent's cache hot (a cold agent's file is read on the reader thread
meanwhile: the sequence is LOADING, and the loop wakes when the read is done), reuse what the cache
holds of the prompt (trimming a divergent tail, which a sliding-window cache that has moved on cannot
do: it starts over), and reserve the KV blocks the prompt needs. Memory that is short *now* makes the
sequence BLOCKED; a prompt that could never fit, a damaged agent or an unknown one fails it.

Claims: an agent serves one request at a time. A sequence claims its agent when routing picks it,
and the engine releases the claim when the request ends; a claimed agent is BUSY for others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from semantic_core.agents.agent import Agent
from semantic_core.agents.prefix_index import common_prefix
from semantic_core.agents.routing import RouteKind, route
from semantic_core.agents.store import AgentStore
from semantic_core.engine.request import PendingLoad, Sequence
from semantic_core.engine.residency import Residency
from semantic_core.engine.scheduler import Prepared, Readiness
from semantic_core.errors import AgentNotFound, PoolExhausted, SemanticError, StoreFull
from semantic_core.model import kv
from semantic_core.observability import get_logger

log = get_logger("semantic.engine")

_LOADING = Prepared(Readiness.LOADING)


class Admission:
    def __init__(
        self,
        store: AgentStore,
        residency: Residency,
        new_cache: Callable[[], kv.Cache],
        *,
        budget_mb: float,
        anything_running: Callable[[], bool],
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.residency = residency
        self.new_cache = new_cache
        self.budget_mb = budget_mb
        self.anything_running = anything_running
        self.wake = wake
        self.claims: dict[str, Sequence] = {}  # agent id -> the sequence it serves
        self.loading: dict[int, PendingLoad] = {}  # sequence id -> its read in flight
        # In a cluster, an agent a request holds (a preempted one, saved and out of memory) keeps
        # its owner.
        store.in_use = lambda agent_id: agent_id in self.claims or agent_id in self.loading_agents()

    # Claims --------------------------------------------------------------------------------------

    def claim(self, seq: Sequence, agent: Agent) -> None:
        seq.agent_id = agent.id
        self.claims[agent.id] = seq
        agent.touch()

    def release(self, seq: Sequence) -> None:
        if seq.agent_id is not None and self.claims.get(seq.agent_id) is seq:
            del self.claims[seq.agent_id]
        self.loading.pop(seq.id, None)

    def loading_agents(self) -> set[str]:
        """Agents whose files are being read for a waiting request (they may not be deleted)."""
        return {load.agent_id for load in self.loading.values()}

    def busy(self) -> set[str]:
        return set(self.claims) | self.loading_agents()

    # Prepare ---------------------------------------------------------------------------------------

    def prepare(self, seq: Sequence, protect: set[str]) -> Prepared:
        """The scheduler's `prepare`: READY with blocks reserved, or why the sequence must wait."""
        if seq.load is not None:
            waiting = self._finish_load(seq, protect)
            if waiting is not None:
                return waiting
        if seq.agent_id is None:
            waiting = self._resolve(seq, protect)
            if waiting is not None:
                return waiting
        assert seq.agent_id is not None
        agent = self.store.get(seq.agent_id)
        if not self.residency.is_hot(agent.id):
            if self.store.take(agent.id) is None:  # in a cluster: only its owner makes an agent hot
                raise AgentNotFound(agent.id)  # deleted by another instance meanwhile
            if agent.on_disk and agent.tokens:
                return self._start_load(seq, agent)
            try:
                self.residency.make_hot_slot(protect | {agent.id})
            except PoolExhausted:
                return self._blocked(agent)
            self.residency.place(agent, self.new_cache())
            if agent.tokens:
                self.store.set_tokens(agent, [])
        return self._reserve(seq, agent, protect)

    def _reserve(self, seq: Sequence, agent: Agent, protect: set[str]) -> Prepared:
        """Reuse what the hot cache holds of the prompt; reserve blocks for the rest."""
        cache = self.residency.cache(agent.id)
        # Keep at least one prompt token to compute: its logits give the first answer token.
        reuse = len(agent.tokens) if seq.preempted else common_prefix(agent.tokens, seq.prompt)
        reuse = min(reuse, len(seq.prompt) - 1)
        if not seq.preempted and reuse < min(len(agent.tokens), len(seq.prompt) - 1):
            seq.diverged_from = len(agent.tokens)
        need = len(seq.prompt) + 1
        if not self.residency.fits_ever(need):
            raise PoolExhausted(
                f"the prompt needs {need} tokens of KV cache and the whole pool holds "
                f"{self.residency.capacity_tokens()} (SEMANTIC_MLX_CACHE_BUDGET_MB={self.budget_mb:g}); "
                "shorten the prompt or raise the budget",
                never_fits=True,
            )
        keep = protect | ({seq.parent_id} if seq.parent_id else set())
        if reuse < len(agent.tokens):
            if kv.can_trim_to(cache, reuse):
                kv.trim_to(cache, reuse)
                self.store.set_tokens(agent, agent.tokens[:reuse])
            else:  # a sliding window moved past the divergence: start this agent's cache over
                reuse = 0
                self.residency.place(agent, self.new_cache())
                self.store.set_tokens(agent, [])
            self.residency.shrink(agent, reuse)
        try:
            self.residency.ensure(agent, need, protect=keep)
            self.residency.unshare(agent, protect=keep)
        except PoolExhausted:
            return self._blocked(agent)
        seq.cached = reuse
        return Prepared(Readiness.READY)

    def _blocked(self, waiting: Agent | None = None) -> Prepared:
        """Memory is short now. Waiting helps only if something running will finish (the waiting
        request's own agent does not count as something to evict)."""
        exclude = {waiting.id} if waiting is not None else set()
        if not self.anything_running() and not self.residency.evictable(exclude):
            raise PoolExhausted(
                "the KV pool is full of pinned agents and nothing can be evicted; unpin or evict an agent, "
                "or raise SEMANTIC_MLX_CACHE_BUDGET_MB"
            )
        return Prepared(Readiness.BLOCKED)

    # Routing ------------------------------------------------------------------------------------------

    def _resolve(self, seq: Sequence, protect: set[str]) -> Prepared | None:
        req = seq.request
        busy = self.busy()
        if req.agent_id is not None and req.agent_id not in busy:
            self.store.take(req.agent_id)  # in a cluster: ours, and seen as its files say (or AgentElsewhere)
        elsewhere: set[str] = set()
        while True:
            decision = route(
                self.store, seq.prompt, req.agent_id, create=req.create_agent, busy=busy, elsewhere=elsewhere
            )
            candidate = decision.agent_id if decision.kind is RouteKind.CONTINUE else decision.parent_id
            if req.agent_id is not None or candidate is None or self.store.fresh(candidate):
                break
            # In a cluster: an agent this instance does not hold. Take it (its view is re-read, so
            # route again), or leave it to the instance that holds it.
            if not self.store.may_take(self.store.get(candidate)):
                elsewhere.add(candidate)
        kind = decision.kind
        if kind is RouteKind.WAIT:
            return Prepared(Readiness.BUSY)
        if kind is RouteKind.NAMED:
            assert decision.agent_id is not None
            self.claim(seq, self.store.get(decision.agent_id))
            return None
        if kind is RouteKind.CREATE:
            agent = self.new_agent(decision.agent_id, protect, system_prompt=req.system_prompt)
            seq.created_agent = True
            self.claim(seq, agent)
            return None
        if kind is RouteKind.NEW:
            agent = self.new_agent(None, protect, system_prompt=req.system_prompt)
            seq.created_agent = True
            self.claim(seq, agent)
            return None
        source_id = decision.agent_id if kind is RouteKind.CONTINUE else decision.parent_id
        assert source_id is not None
        source = self.store.get(source_id)
        if not self.residency.is_hot(source.id):
            seq.parent_id = source.id
            return self._start_load(seq, source)
        if kind is RouteKind.CONTINUE:
            seq.parent_id = None
            self.claim(seq, source)  # the same conversation, resent with a new turn
            return None
        return self._fork(seq, source, decision.length, protect)

    def _fork(self, seq: Sequence, parent: Agent, length: int, protect: set[str]) -> Prepared | None:
        """A new agent whose cache shares the first `length` tokens of `parent`'s (views; copy on
        write), for a request that shares only a prefix with it."""
        try:
            self.residency.make_hot_slot(protect | {parent.id})
        except PoolExhausted:
            return self._blocked()
        req = seq.request
        child = self.new_agent(None, protect | {parent.id}, system_prompt=req.system_prompt, forked_from=parent.id)
        shared = kv.fork(self.residency.cache(parent.id), length)
        if shared is None:  # a sliding window moved past that prefix: nothing to share
            self.residency.place(child, self.new_cache())
        else:
            self.residency.place(child, shared)
            try:
                self.residency.fork_blocks(parent, child, length)
            except PoolExhausted:
                self.residency.release(child.id)
                self.store.unregister(child)
                return self._blocked()
            self.store.set_tokens(child, list(parent.tokens[:length]))
        seq.parent_id = parent.id
        seq.created_agent = True
        self.claim(seq, child)
        return None

    def new_agent(self, agent_id: str | None, protect: set[str], **fields: Any) -> Agent:
        """A new agent; when the store is full (SEMANTIC_AGENT_MAX_AGENTS), the least recently used
        agent a stateless client left behind (created without a name) is deleted to make room."""
        try:
            return self.store.create(agent_id, **fields)
        except StoreFull:
            victim = self.store.recyclable(protect | self.busy() | self._running())
            if victim is None:
                raise
            log.info("store full: recycling the least recently used unnamed agent", agent=victim.id)
            self.residency.release(victim.id)
            self.store.forget(victim)
            return self.store.create(agent_id, **fields)

    def _running(self) -> set[str]:
        return {a for a in self.residency.hot_ids() if self.residency.is_running(a)}

    # Loading -------------------------------------------------------------------------------------------

    def _start_load(self, seq: Sequence, agent: Agent) -> Prepared:
        """Read the agent's file on the reader thread; the loop wakes when it is done."""
        future = self.store.read_async(agent)
        future.add_done_callback(lambda _: self.wake())
        seq.load = PendingLoad(future, agent.id)
        self.loading[seq.id] = seq.load
        return Prepared(Readiness.LOADING, holds=(agent.id,))

    def _finish_load(self, seq: Sequence, protect: set[str]) -> Prepared | None:
        """Turn a finished read into a hot cache once the pool has room for it; None when the
        sequence may go on being prepared (resolve again, or reserve)."""
        load = seq.load
        assert load is not None
        if not load.future.done():
            return Prepared(Readiness.LOADING, holds=(load.agent_id,))
        target = self.store._agents.get(load.agent_id)
        if target is None or self.residency.is_hot(target.id):
            # Deleted meanwhile (only an unnamed candidate can be: a claimed agent cannot), or
            # loaded meanwhile by an agent operation: resolve again.
            self._drop_load(seq)
            if target is None:
                seq.parent_id = None
            return None
        if load.future.exception() is None:
            tokens = len(load.future.result()[0].tokens)
            if not self.residency.fits_ever(tokens + 1):
                self._drop_load(seq)
                raise PoolExhausted(
                    f"agent {target.id!r} holds {tokens} tokens of KV cache, more than the whole pool "
                    f"({self.residency.capacity_tokens()} tokens); raise SEMANTIC_MLX_CACHE_BUDGET_MB",
                    never_fits=True,
                )
            try:
                self.residency.make_hot_slot(protect | {target.id})
                self.residency.place(target, [])
                self.residency.ensure(target, tokens, protect=protect)
            except PoolExhausted:
                self.residency.release(target.id)
                return self._blocked(target)  # the read result waits in the future
        self._drop_load(seq)
        try:
            cache = self.store.finish_load(target, load.future)
        except SemanticError:
            self.residency.release(target.id)
            if seq.agent_id == target.id:
                raise
            seq.parent_id = None  # the candidate is unusable: resolve again without it
            return None
        self.residency.place(target, cache if cache is not None else self.new_cache())
        target.touch()
        return None

    def _drop_load(self, seq: Sequence) -> None:
        seq.load = None
        self.loading.pop(seq.id, None)
