"""The agent store: every agent's record, the tokens its cache holds, its file, and the prefix index
over all of them. What is in memory (hot caches, pool blocks, running requests) is the engine's
residency; the store knows agents as records and files.

An agent is listed from its file's header at start-up without reading tensors; a file that fails
verification is moved to the quarantine folder and the agent is listed as damaged.

There is no warm tier (cache in host memory but released from the pool). On this product's
targets, CPU and Apple Silicon, MLX arrays already live in host memory: a warm tier would move the
accounting, not a byte, and a budget that does not bound real memory is no budget. On CUDA it would
pay (host RAM is not GPU memory); there it can be added beside `hot`.

Threading: every method runs on the engine thread, which owns all MLX work. File writes run on one
writer thread, turn journals on another, reads on a third; those touch only numpy buffers and files,
never MLX (MLX is not thread-safe, see mlx issue #2067). Saves are write-through: after each turn the
engine hands the agent's tensors to the writer, so evicting an agent later costs nothing.

In a cluster (instances sharing this folder), which instance may write an agent is `SharedFolder`'s
part of the store (shared_folder.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from semantic_core.agents import disk
from semantic_core.agents.agent import Agent
from semantic_core.agents.ownership import Ownership
from semantic_core.agents.prefix_index import PrefixIndex, PrefixMatch, common_prefix
from semantic_core.agents.record import AgentRecord, Sampling, generate_agent_id, validate_agent_id
from semantic_core.agents.shared_folder import SharedFolder, temp_owner
from semantic_core.errors import (
    AgentDamaged,
    AgentExists,
    AgentNotFound,
    ModelMismatch,
    StorageError,
    StoreFull,
)
from semantic_core.model import kv
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.agents")

ReadResult = tuple[disk.AgentHeader, list[kv.LayerState], float]


class AgentStore(SharedFolder):
    def __init__(
        self,
        agents_dir: Path,
        quarantine_dir: Path,
        *,
        fingerprint: str,
        model_id: str,
        block_tokens: int,
        metrics: Metrics | None = None,
        expect: disk.Expectations | None = None,
        max_agents: int = 0,
        ownership: Ownership | None = None,
        inline_io: bool = False,
    ) -> None:
        self.metrics = metrics or Metrics()
        # In a cluster (instances sharing this folder): who may write which agent. None: this
        # process is the folder's only user.
        self.ownership = ownership
        self._fresh: set[str] = set()  # owned agents whose view here was re-read after taking them
        self.in_use: Callable[[str], bool] = lambda _agent_id: False  # held by a request (admission)
        self.expect = expect
        self.max_agents = max_agents  # 0: no limit
        self.agents_dir = agents_dir
        self.quarantine_dir = quarantine_dir
        self.fingerprint = fingerprint
        self.model_id = model_id
        self.index = PrefixIndex(block_tokens)
        self._agents: dict[str, Agent] = {}
        self._folded: dict[str, str] = {}  # lower-cased id -> id: ids are unique ignoring case
        self._pending: dict[str, Future[tuple[int, int, float]]] = {}  # saves in flight, by agent
        self._writer: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-writer")
        self._reader: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-reader")
        # Turn journals are small and hold answers back until they are durable: they never wait
        # behind a large tensor write.
        self._journal: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-journal")
        if inline_io:
            # Distributed ranks: every read and write done when asked, so that no rank's decisions
            # depend on how fast its disk was (see engine/distributed.py).
            self._writer = self._reader = self._journal = InlineExecutor()
        self.id_rng: random.Random | None = None  # agent ids drawn from it (distributed ranks agree)
        self.quarantined_total = 0
        self.saves_total = 0
        self.loads_total = 0
        self.agents_dir.mkdir(parents=True, exist_ok=True)

    # Start-up ------------------------------------------------------------------------------------

    def scan(self) -> None:
        """List every saved agent (cold) from its header; quarantine what does not verify."""
        for tmp in disk.stale_temp_files(self.agents_dir):
            # In a cluster, a live instance may be writing it: only the agent's owner removes it.
            if self._may_repair(temp_owner(tmp.name), functools.partial(tmp.unlink, missing_ok=True)):
                log.info("removed an unfinished save", file=tmp.name)
        for path in sorted(self.agents_dir.glob(f"*{disk.SUFFIX}")):
            self._scan_file(path)
        for path in sorted(self.agents_dir.glob(f"*{disk.JOURNAL_SUFFIX}")):
            self._apply_journal(path)
        for agent in self._agents.values():
            self.went_cold(agent)
        self._update_disk_gauge()
        log.info("agent store ready", agents=len(self._agents), folder=str(self.agents_dir))

    def _scan_file(self, path: Path) -> Agent | None:
        try:
            header = disk.read_header(path)
            if header.fingerprint == self.fingerprint and self.expect is not None:
                self.expect.check(header)
        except disk.CorruptAgentFile as exc:
            reason = str(exc)
            self._may_repair(path.stem, lambda: self._quarantine(path, path.stem, reason))
            return None
        agent = Agent(record=header.record, tokens=header.tokens, disk_bytes=header.size_bytes)
        agent.saved_version = agent.version
        agent.compatible = header.fingerprint == self.fingerprint
        if not agent.compatible and self.expect is not None:
            agent.mismatch = disk.kv_format_mismatch(header, self.expect, self.model_id)
        self._register(agent)
        if agent.compatible:
            self.index.set(agent.id, agent.tokens)
        return agent

    def _apply_journal(self, path: Path) -> None:
        """A turn journal newer than its agent's file supplies the record (the conversation)."""
        try:
            record, fingerprint = disk.read_journal(path)
        except disk.CorruptAgentFile as exc:
            reason = str(exc)

            def quarantine() -> None:
                log.error("a turn journal failed verification and was quarantined", file=path.name, reason=reason)
                disk.quarantine(path, self.quarantine_dir, reason)
                self.quarantined_total += 1
                self.metrics.quarantined.inc()

            self._may_repair(path.name[: -len(disk.JOURNAL_SUFFIX)], quarantine)
            return
        agent = self._agents.get(record.id)
        if agent is not None and agent.damaged and record.revision > 0:
            # Its file was quarantined, but the conversation survives in the journal: keep the agent,
            # with no cache (the next turn computes it).
            log.warning("agent recovered from its turn journal; its cache will be recomputed", agent=record.id)
            self.unregister(agent)
            agent = None
        if agent is None:
            # The agent's first turn: its tensors were never written. Its conversation is all there is.
            agent = Agent(record=record, tokens=[])
            agent.compatible = fingerprint == self.fingerprint
            self._register(agent)
            return
        if agent.damaged or record.revision <= agent.record.revision:
            revision = agent.record.revision
            self._may_repair(agent.id, lambda: disk.remove_journal_if_covered(path, revision))
            return
        agent.record = record
        agent.changed()  # the file holds an older record: dirty, so it is written again when hot
        agent.message_count = len(record.messages)

    def _register(self, agent: Agent) -> None:
        self._agents[agent.id] = agent
        self._folded.setdefault(agent.id.lower(), agent.id)
        agent.message_count = len(agent.record.messages)

    def close(self) -> None:
        # The writer hands journal removals to the journal thread: it stops last.
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._journal.shutdown(wait=True)

    # Lookup --------------------------------------------------------------------------------------

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[Agent]:
        return iter(list(self._agents.values()))

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise AgentNotFound(agent_id)
        return agent

    def owns(self, agent: Agent) -> bool:
        """Whether this very agent object is still the store's (not deleted meanwhile)."""
        return self._agents.get(agent.id) is agent

    def best_prefix(self, tokens: list[int], *, exclude: set[str] | frozenset[str] = frozenset()) -> PrefixMatch | None:
        """The usable agent whose cached tokens share the longest prefix with `tokens`."""
        eligible = [a.id for a in self._agents.values() if a.compatible and not a.damaged and a.id not in exclude]
        depth, ids = self.index.candidates(tokens, eligible)
        if not ids:
            return None
        best: PrefixMatch | None = None
        for agent_id in ids:
            agent = self._agents[agent_id]
            n = common_prefix(agent.tokens, tokens)
            better = (
                best is None
                or n > best.length
                or (n == best.length and agent.last_access > self._agents[best.agent_id].last_access)
            )
            if n >= depth * self.index.block_tokens and better:
                best = PrefixMatch(agent_id, n)
        return best

    # Records -------------------------------------------------------------------------------------

    def create(
        self,
        agent_id: str | None = None,
        *,
        display_name: str | None = None,
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
        forked_from: str | None = None,
    ) -> Agent:
        implicit = agent_id is None
        if agent_id is None:
            agent_id = generate_agent_id(set(self._folded), rng=self.id_rng)
            # In a cluster another instance may have drawn the same id since this one last looked.
            while self.ownership is not None and self._taken_elsewhere(agent_id):
                agent_id = generate_agent_id(set(self._folded), rng=self.id_rng)
        validate_agent_id(agent_id)
        if self.ownership is not None and self.take(agent_id) is not None:
            raise AgentExists(agent_id)  # another instance of the cluster created it
        if agent_id in self._agents:
            raise AgentExists(agent_id)
        other = self._folded.get(agent_id.lower())
        if other is not None:
            # Case-insensitive file systems (macOS) would store both in one file.
            raise AgentExists(
                agent_id,
                f"agent {other!r} already exists, and ids that differ only in case "
                "name the same file on some file systems",
            )
        if self.max_agents and len(self._agents) >= self.max_agents:
            raise StoreFull(
                f"the agent store is full: {len(self._agents)} agents (SEMANTIC_AGENT_MAX_AGENTS); "
                "delete agents to make room"
            )
        record = AgentRecord(
            id=agent_id,
            display_name=display_name,
            system_prompt=system_prompt,
            sampling=sampling or Sampling(),
            forked_from=forked_from,
            implicit=implicit,
        )
        agent = Agent(record=record)
        self._register(agent)
        return agent

    def recyclable(self, protect: set[str]) -> Agent | None:
        """The least recently used unpinned agent created without a name (a stateless client's
        conversation), to make room for a new one when the store is full."""
        idle = [
            a
            for a in self._agents.values()
            if a.record.implicit and not a.record.pinned and a.id not in protect and a.id not in self._pending
        ]
        return min(idle, key=lambda a: a.last_access) if idle else None

    def rename(self, agent_id: str, display_name: str | None) -> Agent:
        agent = self.get(agent_id)
        agent.record.display_name = display_name or None
        agent.changed()
        return agent

    def set_pinned(self, agent_id: str, pinned: bool) -> Agent:
        agent = self.get(agent_id)
        agent.record.pinned = pinned
        agent.changed()
        return agent

    def forget(self, agent: Agent) -> None:
        """Remove an agent from disk, then from memory (the caller released its hot state). If its
        files cannot be removed, nothing changes and StorageError says why."""
        self._check_owner(agent, "delete")
        self.wait_pending(agent)
        self._journal.submit(lambda: None).result()  # a journal write in flight lands first
        for path in (disk.agent_path(self.agents_dir, agent.id), disk.journal_path(self.agents_dir, agent.id)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"could not delete agent {agent.id!r}: {exc.strerror or exc}") from exc
        self.unregister(agent)
        self._update_disk_gauge()
        if self.ownership is not None:
            self._fresh.discard(agent.id)
            self.ownership.release(agent.id)

    def unregister(self, agent: Agent) -> None:
        """Drop an agent from memory only (its creation failed, or its files are gone)."""
        if self._agents.get(agent.id) is agent:
            del self._agents[agent.id]
        if self._folded.get(agent.id.lower()) == agent.id:
            del self._folded[agent.id.lower()]
        self.index.remove(agent.id)

    def set_tokens(self, agent: Agent, tokens: list[int]) -> None:
        agent.tokens = tokens
        agent.changed()
        if agent.compatible:
            self.index.set(agent.id, tokens)

    # Conversations ---------------------------------------------------------------------------------

    def went_cold(self, agent: Agent) -> None:
        """Cold agents keep their conversation on disk only (bounded memory with many agents)."""
        if agent.damaged or not agent.messages_loaded:
            return
        if agent.dirty and not agent.on_disk and agent.record.messages:
            return  # nowhere to read it back from yet
        agent.message_count = len(agent.record.messages)
        agent.record.messages = []
        agent.messages_loaded = False

    def load_messages(self, agent: Agent) -> list[dict[str, Any]]:
        """The agent's conversation, read from disk if it is not in memory."""
        if agent.messages_loaded:
            return agent.record.messages
        record = self._record_on_disk(agent)
        return record.messages if record is not None else []

    def restore_messages(self, agent: Agent) -> None:
        """The agent is hot again: its conversation comes back into memory (saves write it)."""
        if agent.messages_loaded:
            return
        record = self._record_on_disk(agent)
        agent.record.messages = list(record.messages) if record is not None else []
        agent.messages_loaded = True
        agent.message_count = len(agent.record.messages)

    def _record_on_disk(self, agent: Agent) -> AgentRecord | None:
        """The newest record on disk: the turn journal's if it is newer than the file's."""
        best: AgentRecord | None = None
        try:
            best = disk.read_header(disk.agent_path(self.agents_dir, agent.id)).record
        except (disk.CorruptAgentFile, OSError):
            best = None
        jpath = disk.journal_path(self.agents_dir, agent.id)
        if jpath.exists():
            try:
                record, _ = disk.read_journal(jpath)
                if best is None or record.revision > best.revision:
                    best = record
            except disk.CorruptAgentFile:
                pass
        return best

    def reset_to_disk(self, agent: Agent) -> None:
        """After a failure: the agent's tokens are what its file holds again (it has no hot cache)."""
        self.wait_pending(agent)
        tokens: list[int] = []
        if agent.on_disk:
            try:
                tokens = disk.read_header(disk.agent_path(self.agents_dir, agent.id)).tokens
            except (disk.CorruptAgentFile, OSError):
                agent.saved_version = -1
        agent.tokens = tokens
        if agent.compatible and not agent.damaged:
            self.index.set(agent.id, tokens)

    def rehome(self, agent: Agent) -> None:
        """An agent of another model becomes this model's: its record (conversation included) is
        kept, its tokens (another model's cache) dropped, and its file rewritten for this model."""
        self.restore_messages(agent)
        agent.compatible = True
        agent.mismatch = None
        agent.tokens = []
        agent.changed()
        self.save(agent, None)
        self.index.set(agent.id, [])
        log.info("agent moved to the loaded model; its next turn recomputes its conversation", agent=agent.id)

    # Saving --------------------------------------------------------------------------------------

    def saving(self, agent_id: str) -> bool:
        return agent_id in self._pending

    def save_async(self, agent: Agent, cache: kv.Cache | None) -> Future[tuple[int, int, float]] | None:
        """Hand a snapshot of the agent (its record and `cache`, which holds `agent.tokens`) to the
        writer thread. Engine thread only (it makes numpy views of MLX arrays)."""
        if agent.damaged or not agent.compatible:
            return None
        if not agent.dirty and agent.id not in self._pending:
            return None
        self._check_owner(agent, "write")
        if cache is None:
            if agent.tokens:
                raise StorageError(f"agent {agent.id!r} has tokens but no cache in memory to save")
            states: list[kv.LayerState] = []
        else:
            if kv.tokens_held(cache) != len(agent.tokens):
                raise StorageError(
                    f"agent {agent.id!r}: its cache holds {kv.tokens_held(cache)} tokens, "
                    f"its record {len(agent.tokens)}"
                )
            states = kv.to_states(cache)
        record = copy.deepcopy(agent.record)
        tokens = list(agent.tokens)
        version = agent.version
        path = disk.agent_path(self.agents_dir, agent.id)
        fingerprint, model_id = self.fingerprint, self.model_id
        journal = disk.journal_path(self.agents_dir, agent.id)
        revision = record.revision

        def write() -> tuple[int, int, float]:
            start = time.perf_counter()
            size = disk.write_agent_file(path, record, tokens, states, fingerprint=fingerprint, model_id=model_id)
            # On the journal's own thread, so it runs after any journal write in flight (which may
            # not have landed yet: checking for the file here would race with it).
            with contextlib.suppress(RuntimeError):  # closing: the next start-up removes it
                self._journal.submit(disk.remove_journal_if_covered, journal, revision)
            return version, size, time.perf_counter() - start

        future = self._writer.submit(write)
        self._pending[agent.id] = future
        return future

    def save(self, agent: Agent, cache: kv.Cache | None) -> None:
        """Save now and wait (eviction, shutdown, explicit saves). Raises StorageError."""
        self.save_async(agent, cache)
        self.wait_pending(agent)
        if agent.save_error:
            raise StorageError(agent.save_error)

    def journal_async(self, agent: Agent) -> Future[float]:
        """Write the agent's record (the finished turn) durably on the journal thread; the future
        gives the seconds it took, or raises StorageError."""
        self._check_owner(agent, "write")
        record = copy.deepcopy(agent.record)
        path = disk.journal_path(self.agents_dir, agent.id)
        fingerprint, model_id = self.fingerprint, self.model_id

        def write() -> float:
            start = time.perf_counter()
            disk.write_journal(path, record, fingerprint=fingerprint, model_id=model_id)
            return time.perf_counter() - start

        return self._journal.submit(write)

    def poll_io(self) -> bool:
        """Apply finished saves (engine thread); True while some are still in flight."""
        for agent_id, fut in list(self._pending.items()):
            if fut.done() and agent_id in self._agents:
                self._finish_save(self._agents[agent_id], fut)
            elif fut.done():
                del self._pending[agent_id]
        return bool(self._pending)

    def wait_pending(self, agent: Agent) -> None:
        fut = self._pending.get(agent.id)
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result()
            self._finish_save(agent, fut)

    def _finish_save(self, agent: Agent, fut: Future[tuple[int, int, float]]) -> None:
        if self._pending.get(agent.id) is fut:
            del self._pending[agent.id]
        try:
            version, size, seconds = fut.result()
        except Exception as exc:
            agent.save_error = str(exc)
            self.metrics.saves.labels("error").inc()
            log.error("agent save failed; the previous file is intact", agent=agent.id, error=str(exc))
            return
        agent.save_error = None
        agent.saved_version = max(agent.saved_version, version)
        agent.disk_bytes = size
        self.saves_total += 1
        self.metrics.saves.labels("ok").inc()
        self.metrics.save_seconds.observe(seconds)
        self._update_disk_gauge()

    # Loading -------------------------------------------------------------------------------------

    def read_async(self, agent: Agent) -> Future[ReadResult]:
        """Read and verify the agent's file on the reader thread (numpy only)."""
        path = disk.agent_path(self.agents_dir, agent.id)
        fingerprint, expect = self.fingerprint, self.expect

        def read() -> ReadResult:
            start = time.perf_counter()
            header, states = disk.read_agent_file(path, fingerprint, expect)
            return header, states, time.perf_counter() - start

        return self._reader.submit(read)

    def finish_load(self, agent: Agent, fut: Future[ReadResult]) -> kv.Cache | None:
        """Turn a finished read into a cache (engine thread); None for an agent that holds no tokens.
        Quarantines a failed file (AgentDamaged)."""
        try:
            header, states, seconds = fut.result()
        except ModelMismatch:
            agent.compatible = False
            self.index.remove(agent.id)
            self.metrics.loads.labels("mismatch").inc()
            raise
        except disk.CorruptAgentFile as exc:
            path = disk.agent_path(self.agents_dir, agent.id)
            self._quarantine(path, agent.id, str(exc))
            raise AgentDamaged(f"agent {agent.id!r} failed verification and was quarantined: {exc}") from exc
        except FileNotFoundError as exc:
            self.metrics.loads.labels("error").inc()
            raise StorageError(f"the file of agent {agent.id!r} is gone") from exc
        try:
            cache = kv.from_states(states) if header.tokens else None
        except Exception as exc:  # validated, yet MLX refused it: the file is not usable here
            path = disk.agent_path(self.agents_dir, agent.id)
            self._quarantine(path, agent.id, f"the cache could not be restored: {type(exc).__name__}")
            raise AgentDamaged(f"agent {agent.id!r} could not be restored and was quarantined") from exc
        agent.tokens = header.tokens
        self.restore_messages(agent)
        self.loads_total += 1
        self.metrics.loads.labels("ok").inc()
        self.metrics.load_seconds.observe(seconds)
        return cache

    # Quarantine ----------------------------------------------------------------------------------

    def _quarantine(self, path: Path, agent_id: str, reason: str) -> None:
        target = None
        if os.path.lexists(path):  # a dangling symlink is moved aside too
            target = disk.quarantine(path, self.quarantine_dir, reason)
        self.quarantined_total += 1
        self.metrics.quarantined.inc()
        log.error(
            "agent file failed verification and was quarantined",
            agent=agent_id,
            reason=reason,
            moved_to=str(target) if target else None,
        )
        agent = self._agents.get(agent_id)
        if agent is None:
            try:
                validate_agent_id(agent_id)
            except Exception:
                return
            agent = Agent(record=AgentRecord(id=agent_id))
            self._register(agent)
        agent.damaged = reason
        agent.tokens = []
        agent.saved_version = -1
        self.index.remove(agent_id)
        self._update_disk_gauge()

    def disk_bytes(self) -> int:
        return sum(a.disk_bytes for a in self._agents.values() if a.on_disk)

    def _update_disk_gauge(self) -> None:
        self.metrics.disk_bytes.set(self.disk_bytes())


class InlineExecutor(Executor):
    """Runs each task when it is submitted: the future is done on return."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future
