"""Which instance owns an agent, when several `semantic serve` share one agents folder.

Instances of a cluster share the folder (a local disk for instances on one machine, a network file
system across machines), so a dead instance's agents are already where a survivor looks for them, and
the turn journal's rule (a turn is on disk before its answer completes) holds across instances.
Sharing files needs one rule: only the agent's owner writes it (its file, its journal) or holds its
cache in memory. Ownership is an exclusive `flock` on `<cache dir>/owners/<id>.lock`:

- the kernel drops the lock when its process dies (`kill -9` included), so a survivor can take an
  agent over at once, with no lease to wait out; a process that hangs keeps its locks, so nobody
  writes under it (its agents answer 529 elsewhere until it dies or answers);
- `flock` belongs to the open file, so one descriptor per owned agent is kept open, and only
  while the agent is in this instance's memory or being written; an agent that goes cold with its
  files written is released, so descriptors stay bounded by the hot agents;
- the lock file holds the owner's instance name and URL: an instance that needs an agent another
  live instance holds asks that URL to release it (`POST /v1/agents/{id}/release`), which saves,
  evicts and unlocks.

Linux's NFS client maps `flock` to byte-range locks that the server arbitrates, so the same code
serves instances on several machines over NFS (v4, or v3 with lockd). Lock files are never deleted:
deleting one while another process opens it would let two processes lock two different files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from semantic_core.observability import get_logger

log = get_logger("semantic.cluster")

LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class Owner:
    """What an owner wrote into its lock file."""

    instance: str
    url: str | None
    pid: int


class Ownership:
    """This instance's locks. Thread-safe: the engine thread takes and releases them; the API's
    threads take them ahead of a request (`acquire`) so that a handoff happens before submission."""

    def __init__(self, owners_dir: Path, instance: str, url: str | None) -> None:
        self.dir = owners_dir
        self.instance = instance
        self.url = url
        self.dir.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}  # agent id -> open descriptor holding the lock
        self._mutex = threading.Lock()

    def path(self, agent_id: str) -> Path:
        return self.dir / f"{agent_id}{LOCK_SUFFIX}"

    def holds(self, agent_id: str) -> bool:
        with self._mutex:
            return agent_id in self._held

    def held(self) -> list[str]:
        with self._mutex:
            return sorted(self._held)

    def try_acquire(self, agent_id: str) -> bool:
        """Lock the agent for this instance without waiting; True if it is (now) ours."""
        with self._mutex:
            if agent_id in self._held:
                return True
            fd = os.open(self.path(agent_id), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            try:
                info = json.dumps({"instance": self.instance, "url": self.url, "pid": os.getpid()}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, info, 0)
            except OSError as exc:  # the lock is what counts; the note only helps others find us
                log.warning("could not write the owner note", agent=agent_id, error=str(exc))
            self._held[agent_id] = fd
            return True

    def release(self, agent_id: str) -> None:
        with self._mutex:
            fd = self._held.pop(agent_id, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def release_all(self) -> None:
        for agent_id in self.held():
            self.release(agent_id)

    def owner(self, agent_id: str) -> Owner | None:
        """Who holds the agent now (None: nobody, or this instance). Never opens a lock this instance
        holds (closing any descriptor of it would not drop a flock, but reading ours is pointless)."""
        if self.holds(agent_id):
            return None
        path = self.path(agent_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                pass  # locked by someone: read who
            else:
                return None  # nobody holds it
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        try:
            note = json.loads(raw or b"{}")
            return Owner(str(note.get("instance", "?")), note.get("url"), int(note.get("pid", 0)))
        except (ValueError, TypeError):
            return Owner("?", None, 0)
