"""An agent as the store knows it: its record, the tokens its cache holds (hot or on disk), and the
bookkeeping of its file (versions saved, size, whether it is usable here). What is in memory (hot
caches, pool blocks) is the engine's residency."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from semantic_core.agents.record import AgentRecord


@dataclass
class Agent:
    record: AgentRecord
    tokens: list[int] = field(default_factory=list)  # what its cache holds, hot or on disk
    version: int = 0  # bumped whenever tokens or record change
    saved_version: int = -1  # version on disk (-1: never saved)
    disk_bytes: int = 0
    compatible: bool = True  # False: its file belongs to another model
    mismatch: str | None = None  # why it is not compatible, when more is known than "another model"
    damaged: str | None = None
    save_error: str | None = None
    last_access: float = field(default_factory=time.monotonic)
    # Cache statistics for the gauges: tokens reused vs recomputed over this agent's life.
    reused_tokens: int = 0
    computed_tokens: int = 0
    # A cold agent's conversation stays on disk (its file or turn journal), not in memory: only the
    # count is kept. It is read back when the agent is loaded, or asked for.
    messages_loaded: bool = True
    message_count: int = 0

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def dirty(self) -> bool:
        return self.saved_version != self.version

    @property
    def on_disk(self) -> bool:
        return self.saved_version >= 0

    def touch(self) -> None:
        self.last_access = time.monotonic()
        self.record.last_used = time.time()

    def changed(self) -> None:
        self.version += 1
        if self.messages_loaded:
            self.message_count = len(self.record.messages)
