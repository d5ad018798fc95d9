"""The store's side of a cluster: instances sharing one agents folder, each agent owned by one of them
at a time (`ownership.py` holds the locks; this is what the store does with them).

- `take` makes this instance an agent's owner and re-reads the agent from its files (another instance
  may have written it since); `release_if_cold` and `hand_over` give it up once its files are written;
- every write (file, journal, delete) checks ownership first (`_check_owner`);
- start-up repairs (stale temp files, quarantines, journal removal) run only for agents no live
  instance holds (`_may_repair`).

Without a cluster (`ownership` None) every agent is this process's: `take` is a lookup, `fresh` is
always true, repairs always run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semantic_core.agents import disk
from semantic_core.agents.ownership import Ownership
from semantic_core.errors import AgentElsewhere, StorageError
from semantic_core.observability import Metrics

if TYPE_CHECKING:
    from semantic_core.agents.agent import Agent
    from semantic_core.agents.prefix_index import PrefixIndex


class SharedFolder:
    """Mixed into AgentStore; the attributes and methods below are the store's."""

    ownership: Ownership | None
    in_use: Callable[[str], bool]  # held by a request (set by admission)
    agents_dir: Path
    metrics: Metrics
    index: PrefixIndex
    _fresh: set[str]  # owned agents whose view here was re-read after taking them
    _agents: dict[str, Agent]
    _pending: dict[str, Future[tuple[int, int, float]]]
    _journal: Executor
    _scan_file: Callable[[Path], Agent | None]
    _apply_journal: Callable[[Path], None]
    went_cold: Callable[[Agent], None]
    unregister: Callable[[Agent], None]
    wait_pending: Callable[[Agent], None]

    def _may_repair(self, agent_id: str, repair: Any) -> bool:
        """Run `repair` (a change to an agent's files found at start-up: a stale temp file, a
        quarantine) unless another instance of the cluster owns that agent now."""
        if self.ownership is None:
            repair()
            return True
        if self.ownership.holds(agent_id):
            repair()
            return True
        if not self.ownership.try_acquire(agent_id):
            return False
        try:
            repair()
        finally:
            self.ownership.release(agent_id)
        return True

    def take(self, agent_id: str) -> Agent | None:
        """Make this instance the agent's owner, with a view of it re-read from its files (another
        instance may have written it since this one last held it). None: no such agent, on disk or
        here (the lock is kept, for a request that creates it). Raises AgentElsewhere while
        another live instance holds it. Engine thread. Without a cluster: the agent as known."""
        if self.ownership is None:
            return self._agents.get(agent_id)
        if not self.ownership.try_acquire(agent_id):
            owner = self.ownership.owner(agent_id)
            raise AgentElsewhere(agent_id, owner.instance if owner else None)
        if agent_id not in self._fresh:
            self.reread(agent_id)
            self._fresh.add(agent_id)
        return self._agents.get(agent_id)

    def _taken_elsewhere(self, agent_id: str) -> bool:
        """Whether a generated id already names an agent on disk or another instance's agent."""
        assert self.ownership is not None
        if disk.agent_path(self.agents_dir, agent_id).exists() or disk.journal_path(self.agents_dir, agent_id).exists():
            return True
        return self.ownership.owner(agent_id) is not None

    def fresh(self, agent_id: str) -> bool:
        """Whether this instance owns the agent with an up-to-date view of it (always, alone)."""
        return self.ownership is None or agent_id in self._fresh

    def may_take(self, agent: Agent) -> bool:
        """Whether this instance owns the agent or can take it now (routing an unnamed request)."""
        if self.ownership is None or agent.id in self._fresh:
            return True
        try:
            return self.take(agent.id) is not None
        except AgentElsewhere:
            return False

    def reread(self, agent_id: str) -> None:
        """Replace what this instance knows of an agent by its files (it is not hot here: hot
        agents are always owned, and this one was not)."""
        known = self._agents.get(agent_id)
        path = disk.agent_path(self.agents_dir, agent_id)
        fresh: Agent | None = None
        if os.path.lexists(path):
            if known is not None:
                self.unregister(known)
            fresh = self._scan_file(path)
        elif known is not None:
            self.unregister(known)
        jpath = disk.journal_path(self.agents_dir, agent_id)
        if jpath.exists():
            self._apply_journal(jpath)
        fresh = self._agents.get(agent_id)
        if fresh is None:
            return
        self.went_cold(fresh)
        if known is not None and known is not fresh:
            # Keep the object others may hold (by identity), with the files' view inside it.
            stats = {"reused_tokens": known.reused_tokens, "computed_tokens": known.computed_tokens}
            known.__dict__.update(fresh.__dict__, **stats)
            self._agents[agent_id] = known

    def release_if_cold(self, agent: Agent) -> None:
        """An agent left this instance's memory: once its files are written, others may take it."""
        if self.ownership is None or not self.ownership.holds(agent.id) or self.in_use(agent.id):
            return
        if agent.id in self._pending or (agent.dirty and self._agents.get(agent.id) is agent):
            return  # written later (eviction saved what it could; a failed save keeps it here)
        self.hand_over(agent.id)

    def hand_over(self, agent_id: str) -> None:
        """Give up ownership: every write of the agent in flight lands first."""
        if self.ownership is None:
            return
        agent = self._agents.get(agent_id)
        if agent is not None:
            self.wait_pending(agent)
        self._journal.submit(lambda: None).result()  # a journal write in flight lands first
        self._fresh.discard(agent_id)
        self.ownership.release(agent_id)

    def _check_owner(self, agent: Agent, action: str) -> None:
        if self.ownership is not None and not self.ownership.holds(agent.id):
            raise StorageError(f"agent {agent.id!r} is not owned by this instance; refusing to {action} it")


def temp_owner(name: str) -> str:
    """The agent id in a temp file's name (`.<id>.safetensors.tmp-...`, `.<id>.turn.json.tmp-...`)."""
    stem = name[1:] if name.startswith(".") else name
    for suffix in (disk.SUFFIX, disk.JOURNAL_SUFFIX):
        marker = f"{suffix}.tmp-"
        if marker in stem:
            return stem.split(marker, 1)[0]
    return stem
