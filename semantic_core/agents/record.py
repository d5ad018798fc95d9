"""What an agent is, apart from its KV tensors: the record that is saved beside them."""

from __future__ import annotations

import random
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from semantic_core.errors import InvalidAgentId

# Ids name files, so they are restricted to a safe alphabet: no separators, no leading dot, bounded.
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_ADJECTIVES = (
    "amber",
    "brisk",
    "calm",
    "deft",
    "eager",
    "fuzzy",
    "gentle",
    "hazel",
    "ivory",
    "jolly",
    "keen",
    "lucid",
    "mellow",
    "nimble",
    "olive",
    "plucky",
    "quiet",
    "rusty",
    "sunny",
    "tidy",
)
_NOUNS = (
    "otter",
    "falcon",
    "badger",
    "heron",
    "lynx",
    "marten",
    "newt",
    "osprey",
    "puffin",
    "quail",
    "raven",
    "stoat",
    "tern",
    "vole",
    "wren",
    "yak",
    "zebu",
    "ibis",
    "gecko",
    "koala",
)


def validate_agent_id(agent_id: str) -> str:
    # fullmatch: `$` would also accept a trailing newline.
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id) or ".." in agent_id:
        raise InvalidAgentId(
            f"invalid agent id {agent_id!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return agent_id


def generate_agent_id(taken: set[str] | None = None, rng: random.Random | None = None) -> str:
    """A new readable id. `rng`: draw from it (ranks of a distributed engine draw the same ids)."""
    taken = taken or set()
    while True:
        if rng is not None:
            candidate = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.getrandbits(16):04x}"
        else:
            candidate = f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.token_hex(2)}"
        if candidate not in taken:
            return candidate


@dataclass
class Sampling:
    """Per-agent defaults for requests that give none (the TUI's "new agent" form sets them)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None


@dataclass
class AgentRecord:
    id: str
    display_name: str | None = None
    system_prompt: str | None = None
    # Conversation text, so a UI can show it after a restart: {"role", "content"} dicts.
    messages: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    pinned: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    forked_from: str | None = None
    # Cached tokens before the last answer began: a request that contains all of them is the same
    # conversation resent (its copy of the answer may tokenize differently), not a new one.
    reply_start: int = 0
    # Bumped at every finished turn: tells which of an agent's file and its turn journal is newer.
    revision: int = 0
    # Created for a request that named no agent (a stateless client's conversation): such agents
    # are recycled, least recently used first, when the store is full; named agents never are.
    implicit: bool = False

    @property
    def name(self) -> str:
        return self.display_name or self.id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentRecord:
        data = dict(data)
        sampling = Sampling(**(data.pop("sampling", None) or {}))
        known = set(cls.__dataclass_fields__)
        return cls(sampling=sampling, **{k: v for k, v in data.items() if k in known})
