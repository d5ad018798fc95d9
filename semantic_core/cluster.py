"""Handoffs between the instances of a cluster (several `semantic serve` sharing one agents folder
behind a proxy that sends each agent to one instance; see docs/CLUSTER.md).

The proxy keeps an agent on one instance while the set of instances stays the same. When it changes
(an instance added, or one back after a restart), an agent's requests reach a new instance while
the old one still holds it. Before such a request is submitted, the new instance asks the owner,
at the URL in the agent's lock file, to release it (`POST /v1/agents/{id}/release`: the owner
writes the agent, drops its cache and unlocks), then takes the lock and reads the agent from its
files. A dead owner holds no lock (the kernel dropped it), so its agents are taken at once.

The request waits at most SEMANTIC_CLUSTER_HANDOFF_SECONDS; after that it is answered 529 with
Retry-After, having changed nothing. The official SDKs retry 529 on their own.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from semantic_core.agents.ownership import Ownership
from semantic_core.config import Settings
from semantic_core.errors import AgentElsewhere
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.cluster")


class Handoff:
    def __init__(self, ownership: Ownership, settings: Settings, metrics: Metrics | None = None) -> None:
        self.ownership = ownership
        self.metrics = metrics
        self.wait_seconds = settings.cluster_handoff_seconds
        key = settings.anthropic_api_key.get_secret_value().split(",")[0].strip() if settings.anthropic_api_key else ""
        self._headers = {"x-api-key": key} if key else {}

    async def acquire(self, agent_id: str) -> None:
        """Make this instance the agent's owner, asking a live owner to release it. Raises
        AgentElsewhere when that does not happen in time."""
        if self.ownership.try_acquire(agent_id):
            return
        deadline = time.monotonic() + self.wait_seconds
        asked_at = 0.0
        owner = None
        held_by: str | None = None  # the live owner seen while waiting (it may be gone when we get the lock)
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=1.0)) as client:
            while True:
                owner = self.ownership.owner(agent_id)
                if owner is not None:
                    held_by = owner.instance
                now = time.monotonic()
                if owner is not None and owner.url and owner.url != self.ownership.url and now - asked_at > 1.0:
                    asked_at = now
                    await self._ask(client, owner.url, agent_id)
                if self.ownership.try_acquire(agent_id):
                    if held_by is not None:
                        if self.metrics is not None:
                            self.metrics.handoffs.labels("taken").inc()
                        log.info("agent taken over from another instance", agent=agent_id, owner=held_by)
                    return
                if time.monotonic() > deadline:
                    raise AgentElsewhere(agent_id, held_by)
                await asyncio.sleep(0.05)

    async def _ask(self, client: httpx.AsyncClient, url: str, agent_id: str) -> None:
        try:
            response = await client.post(f"{url}/v1/agents/{agent_id}/release", headers=self._headers, json={})
        except httpx.HTTPError as exc:
            # Unreachable but holding the lock: hung, or about to die (then the lock goes with it).
            log.warning("the owner of an agent did not answer a handoff", agent=agent_id, error=type(exc).__name__)
            return
        if response.status_code >= 400:
            log.info("the owner of an agent could not hand it over yet", agent=agent_id, status=response.status_code)
