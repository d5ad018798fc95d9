"""Which agent serves a request: the product's policy, decided in one place.

- A request that names an agent (X-Agent-ID, the TUI, `semantic generate --agent`) is served by it,
  created if new (when the caller allows). While that agent serves another request, this one waits:
  a client resending a conversation expects it to continue, not to fail.
- A request without a name is served by the idle agent whose cached tokens share the longest prefix
  with its prompt, at least one block long:
  - if the prompt contains that agent's whole cache, or at least everything before its last answer
    (the client's copy of the answer may re-tokenize differently: the divergent tail is trimmed), it
    is the same conversation resent with a new turn: that agent CONTINUEs;
  - else the request FORKs a new agent that shares the matching prefix (a common system prompt, an
    earlier turn) and leaves the other agent as it was;
- otherwise a NEW agent. Without the continue rule, every turn of a stateless client would leave an
  orphan agent behind.

No MLX and no I/O: admission carries the decision out (loading a cold agent first, forking its
cache, trimming, reserving memory).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from semantic_core.agents.store import AgentStore
from semantic_core.errors import AgentDamaged, AgentNotFound, ModelMismatch


class RouteKind(enum.Enum):
    NAMED = "named"  # the named agent, which exists
    CREATE = "create"  # the named agent, to be created
    CONTINUE = "continue"  # an unnamed request continues this agent's conversation
    FORK = "fork"  # a new agent sharing `length` tokens of `parent_id`'s cache
    NEW = "new"  # a new, empty agent
    WAIT = "wait"  # the named agent is serving another request


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    agent_id: str | None = None
    parent_id: str | None = None
    length: int = 0


def route(
    store: AgentStore,
    tokens: list[int],
    agent_id: str | None,
    *,
    create: bool,
    busy: set[str],
    elsewhere: set[str] | frozenset[str] = frozenset(),
) -> Route:
    """The agent for a request with this prompt. `busy`: agents serving a request now;
    `elsewhere`: agents another instance of the cluster holds (not candidates). Raises
    AgentNotFound, AgentDamaged or ModelMismatch for a named agent that cannot serve."""
    if agent_id is not None:
        if agent_id in busy:
            return Route(RouteKind.WAIT, agent_id)
        if agent_id in store:
            agent = store.get(agent_id)
            if agent.damaged:
                raise AgentDamaged(f"agent {agent.id!r} is damaged: {agent.damaged}")
            if not agent.compatible:
                raise ModelMismatch(
                    agent.mismatch
                    or f"agent {agent.id!r} was saved with another model than the one loaded; move it to this model "
                    f"with POST /v1/agents/{agent.id}/rehome (its next turn recomputes the conversation), load "
                    "that model, or delete the agent"
                )
            return Route(RouteKind.NAMED, agent_id)
        if create:
            return Route(RouteKind.CREATE, agent_id)
        raise AgentNotFound(agent_id)

    match = store.best_prefix(tokens, exclude=busy | elsewhere)
    if match is None or match.length < store.index.block_tokens:
        return Route(RouteKind.NEW)
    candidate = store.get(match.agent_id)
    reply_start = candidate.record.reply_start
    if match.length >= len(candidate.tokens) or 0 < reply_start <= match.length:
        return Route(RouteKind.CONTINUE, candidate.id)
    return Route(RouteKind.FORK, parent_id=candidate.id, length=match.length)
