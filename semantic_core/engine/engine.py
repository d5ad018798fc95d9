"""The engine: one model, many agents, one generation thread.

`Engine` owns the model and its parts, and runs every piece of MLX work on its single generation
thread. Callers (asyncio handlers, the TUI, plain scripts) submit a `GenerationRequest` and read
events from a handle, or run agent operations (`create_agent`, `evict_agent`, ...), which execute
on that thread between two steps.

Each loop turn takes the inbox (typed items: submit, cancel, call, stop), then makes one step:

    plan = schedule()          # admission (admission.py), room for every decoding sequence (preempting
                               # where it must), this step's prefill chunks: scheduler.py, no MLX
    result = runner.execute(plan)   # the forward passes: runner.py, the only MLX of the loop
    update(plan, result)       # tokens -> text and events (output.py), finished turns, prompts
                               # that are done join their decode group

The parts: `Scheduler` (queues and policy), `Admission` (agents made ready: routing, loads,
reuse, blocks), `Runner` (forward passes, decode batches), `Residency` (hot caches and pool
blocks), `AgentStore` (records and files), `AgentOperations` (the agent API). A finished turn is
written to its agent's turn journal before its caller hears of it (durable answers), and a failure
while serving one request fails that request alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from semantic_core.agents.ownership import Ownership
from semantic_core.agents.store import AgentStore
from semantic_core.config import Settings
from semantic_core.engine.admission import Admission
from semantic_core.engine.block_pool import BlockPool
from semantic_core.engine.constraints import Grammars
from semantic_core.engine.distributed import Distributed, Tick, to_message
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.inbox import Call, Cancel, InboxItem, Op, Stop, Submit
from semantic_core.engine.lifecycle import Lifecycle
from semantic_core.engine.operations import AgentOperations
from semantic_core.engine.request import Phase, Sequence, Timing
from semantic_core.engine.residency import Residency
from semantic_core.engine.runner import Runner, StepResult
from semantic_core.engine.scheduler import Scheduler, StepPlan
from semantic_core.engine.snapshot import AgentInfo, EngineSnapshot, Publisher
from semantic_core.engine.types import (
    Event,
    GenerationRequest,
    GenerationResult,
    PrefillProgress,
)
from semantic_core.engine.validation import validate_request
from semantic_core.errors import (
    EngineStopped,
    SemanticError,
)
from semantic_core.model import kv
from semantic_core.model.chat import RenderedPrompt, render_chat
from semantic_core.model.loader import LoadedModel, ModelInfo
from semantic_core.model.tools import ToolFormat
from semantic_core.observability import Metrics, get_logger

log = get_logger("semantic.engine")
T = TypeVar("T")
_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _stop_engines_at_exit() -> None:
    """An engine still running at exit is stopped (and its hot agents saved) before the interpreter
    tears threads down: a thread inside MLX at that moment would abort the process."""
    for engine in list(_RUNNING):
        with contextlib.suppress(Exception):
            engine.stop()


class Engine:
    def __init__(self, settings: Settings, loaded: LoadedModel | None = None, group: Any = None) -> None:
        self.settings = settings
        # Distributed mode (an mx.distributed group of more than one rank): every rank runs this
        # engine in lockstep with rank 0 (see distributed.py).
        self.dist: Distributed | None = Distributed(group) if group is not None and group.size() > 1 else None
        # This engine's metrics (and its API's): never shared with another engine in the process.
        self.metrics = Metrics()
        self._loaded = loaded
        self._inbox: deque[InboxItem] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._stopped = threading.Event()
        # Set when the loop died of an error it could not contain (a bug): probes fail and
        # `semantic serve` exits non-zero, so a supervisor restarts the process.
        self.crash: BaseException | None = None
        self.dead = threading.Event()
        self.scheduler = Scheduler(max_batch=settings.mlx_max_batch_size, prefill_step=settings.mlx_prefill_step_size)
        self.requests_total = 0
        self._listeners: list[Callable[[EngineSnapshot], None]] = []
        # Set at start (on the engine thread):
        self.model: Any = None
        self.tokenizer: Any = None
        self.tool_format: ToolFormat | None = None  # how the model writes tool calls; None: it cannot
        self.grammars: Grammars | None = None
        self.info: ModelInfo | None = None
        self.pool: BlockPool | None = None
        self.store: AgentStore | None = None
        self.residency: Residency | None = None
        self.admission: Admission | None = None
        self.runner: Runner | None = None
        self.agents: AgentOperations | None = None
        self.publisher: Publisher | None = None
        self.life: Lifecycle | None = None
        # In a cluster (instances sharing one agents folder): this instance's agent locks.
        self.ownership: Ownership | None = None
        if settings.cluster_instance:
            self.ownership = Ownership(settings.owners_dir, settings.cluster_instance, settings.cluster_advertised_url)

    # Life cycle ----------------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> Engine:
        """Load the model (on the generation thread) and start serving. Raises what loading raised."""
        if self._thread is not None:
            return self
        _RUNNING.add(self)
        self._thread = threading.Thread(target=_thread_main, args=([self],), name="semantic-engine", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the engine did not start in time")
        if self._start_error is not None:
            raise self._start_error
        return self

    @property
    def ready(self) -> bool:
        return (
            self._started.is_set() and self._start_error is None and not self._stopping and not self._stopped.is_set()
        )

    @property
    def started(self) -> bool:
        return self._started.is_set()

    @property
    def start_error(self) -> BaseException | None:
        return self._start_error

    def stop(self, save: bool = True, timeout: float = 60.0) -> None:
        """Cancel what is queued, finish nothing new, save hot agents (if `save`), stop the thread."""
        if self._thread is None or self._stopped.is_set():
            return
        self._post(Stop(save))
        self._stopped.wait(timeout)
        self.metrics.ready.set(0)

    def wait_stopped(self) -> None:
        """Block until the engine thread has stopped (or died)."""
        while not self._stopped.wait(1.0) and not self.dead.is_set():
            pass

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Submitting ----------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], system: str | None = None) -> RenderedPrompt:
        """Chat template -> tokens (any thread: the tokenizer is not MLX)."""
        return render_chat(self.tokenizer, messages, system, bos=self.info.bos if self.info else None)

    def submit(self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Pass `loop` (or use `submit_async`) to consume events with `async for`."""
        self._check_accepting()
        assert self.info is not None
        validate_request(request, self.info, queue_depth=self.queue_depth(), max_queue=self.settings.server_max_queue)
        handle = RequestHandle(request, loop, lambda h: self._post(Cancel(h)))
        self._post(Submit(handle))
        return handle

    def submit_async(self, request: GenerationRequest) -> RequestHandle:
        return self.submit(request, loop=asyncio.get_running_loop())

    def generate(self, request: GenerationRequest) -> Iterator[Event]:
        """Sync convenience for scripts: iterate the events of one request."""
        return iter(self.submit(request))

    def complete(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).wait()

    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + sum(1 for item in list(self._inbox) if isinstance(item, Submit))

    def _check_accepting(self) -> None:
        if self._stopping or self._stopped.is_set():
            raise EngineStopped()
        if not self._started.is_set() or self._start_error is not None:
            raise EngineStopped("the engine is not running")

    # Calls onto the engine thread -------------------------------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float | None = 120.0) -> T:
        """Run `fn` on the engine thread between two steps and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stopped.is_set():
            raise EngineStopped()
        fut: Future[T] = Future()
        self._post(Call(fn, fut))
        return fut.result(timeout)

    async def acall(self, fn: Callable[[], T]) -> T:
        if self._stopped.is_set():
            raise EngineStopped()
        fut: Future[T] = Future()
        self._post(Call(fn, fut))
        return await asyncio.wrap_future(fut)

    def _post(self, item: InboxItem) -> None:
        self._inbox.append(item)
        self._wake.set()

    # Agent operations (see operations.py) -------------------------------------------------------------

    def _ops(self) -> AgentOperations:
        if self.agents is None:
            raise EngineStopped("the engine has not started")
        return self.agents

    def _op(self, name: str, *args: Any, **kwargs: Any) -> Any:  # the operation's own result
        """An agent operation; in distributed mode every rank runs it, in the same place between steps."""
        ops = self._ops()
        if self.dist is None or threading.current_thread() is self._thread:
            return getattr(ops, name)(*args, **kwargs)
        if self._stopped.is_set():
            raise EngineStopped()
        fut: Future[Any] = Future()
        self._post(Op(name, args, kwargs, fut))
        return fut.result(120.0)

    def create_agent(self, agent_id: str | None = None, **fields: Any) -> AgentInfo:
        info: AgentInfo = self._op("create", agent_id, **fields)
        return info

    def list_agents(self) -> list[AgentInfo]:
        return self._ops().all()

    def get_agent(self, agent_id: str) -> tuple[AgentInfo, list[dict[str, Any]]]:
        return self._ops().get(agent_id)

    def save_agent(self, agent_id: str) -> AgentInfo:
        info: AgentInfo = self._op("save", agent_id)
        return info

    def evict_agent(self, agent_id: str) -> AgentInfo:
        info: AgentInfo = self._op("evict", agent_id)
        return info

    def adopt(self, agent_id: str) -> None:
        """In a cluster, on the engine thread: the agent (locked by this instance) is seen as its
        files say. Nothing without a cluster."""
        if self.store is not None and self.store.ownership is not None:
            self.store.take(agent_id)

    def release_agent(self, agent_id: str) -> None:
        """In a cluster: hand the agent over (written, out of memory, unlocked)."""
        self._ops().release(agent_id)

    def load_agent(self, agent_id: str) -> AgentInfo:
        info: AgentInfo = self._op("load", agent_id)
        return info

    def pin_agent(self, agent_id: str, pinned: bool = True) -> AgentInfo:
        info: AgentInfo = self._op("pin", agent_id, pinned)
        return info

    def rename_agent(self, agent_id: str, display_name: str | None) -> AgentInfo:
        info: AgentInfo = self._op("rename", agent_id, display_name)
        return info

    def delete_agent(self, agent_id: str) -> None:
        self._op("delete", agent_id)

    def fork_agent(self, agent_id: str, new_id: str | None = None, *, display_name: str | None = None) -> AgentInfo:
        info: AgentInfo = self._op("fork", agent_id, new_id, display_name=display_name)
        return info

    def rehome_agent(self, agent_id: str) -> AgentInfo:
        info: AgentInfo = self._op("rehome", agent_id)
        return info

    # Snapshots for readers on other threads ----------------------------------------------------------

    def snapshot(self, fresh: bool = False) -> EngineSnapshot:
        """The latest published snapshot (at most ~0.2 s old while generating), or, with `fresh`,
        one taken now between two steps."""
        if fresh and not self._stopped.is_set() and self.publisher is not None:
            self.call(lambda: self._publish(force=True))
        snap = self.publisher.latest if self.publisher is not None else None
        if snap is None:
            raise EngineStopped("the engine has not started")
        return snap

    def add_listener(self, fn: Callable[[EngineSnapshot], None]) -> None:
        """`fn(snapshot)` runs on the engine thread after each new snapshot: keep it cheap."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[EngineSnapshot], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def _publish(self, force: bool = False) -> None:
        if self.publisher is not None:
            busy = bool(self.scheduler.running())
            self.publisher.publish(
                self.scheduler,
                self._listeners,
                force=force,
                busy=busy,
                stopping=self._stopping,
                requests_total=self.requests_total,
            )

    # The generation thread -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._boot()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            self._stopped.set()
            return
        self._started.set()
        try:
            if self.dist is not None and not self.dist.leader:
                self._follow()
            else:
                self._loop()
        except BaseException as exc:  # a bug the per-request guards did not contain: fail loudly
            self.crash = exc
            log.critical("the engine loop crashed; no request can be served until the process restarts", exc_info=exc)
            with contextlib.suppress(BaseException):
                if self.life is not None:
                    self.life.fail_everything(exc)
            self.dead.set()
        finally:
            self.metrics.ready.set(0)
            if self.runner is not None:
                self.runner.clear()
            # Work queued with async_eval must finish before this thread ends, or MLX's stream
            # threads are torn down at exit with work in flight (a C++ terminate).
            import mlx.core as mx

            mx.synchronize()
            self._stopped.set()

    def _boot(self) -> None:
        from semantic_core.engine.assembly import assemble

        assemble(self)
        self._publish(force=True)

    def _new_cache(self) -> kv.Cache:
        assert self.info is not None  # set by _boot before any cache is made
        return kv.new_cache(self.model, self.info.kv_format)

    def _running_tokens(self, agent_id: str) -> int:
        assert self.admission is not None
        seq = self.admission.claims.get(agent_id)
        if seq is None:
            return 0
        return seq.cache_tokens if seq.phase is Phase.DECODE else seq.cursor

    def _loop(self) -> None:
        assert self.store is not None and self.life is not None
        while True:
            self._drain_inbox()
            if self._stopping:
                return
            saving = self.store.poll_io()
            if self.life.finishing:
                self.life.complete_finished()
            worked = self._step()
            self._publish()
            if not worked:
                pending = self.scheduler.waiting or saving or self.life.finishing
                self._wake.wait(0.05 if pending else 0.5)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        items: list[InboxItem] = []
        while self._inbox:
            items.append(self._inbox.popleft())
        if self.dist is not None:
            # Every rank takes the same inbox this turn (a Call is rank 0's alone: reads, publishing).
            self.dist.tick(Tick([to_message(item) for item in items if not isinstance(item, Call)]))
        self._apply(items)

    def _apply(self, items: list[InboxItem]) -> None:
        for item in items:
            if self.publisher is not None:
                self.publisher.dirty = True
            if isinstance(item, Submit):
                self.scheduler.add(Sequence(item.handle, item.handle.request, Timing(time.monotonic())))
                self.requests_total += 1
            elif isinstance(item, Cancel):
                assert self.life is not None
                self.life.cancel(item.handle)
            elif isinstance(item, Op):
                try:
                    result = getattr(self._ops(), item.name)(*item.args, **item.kwargs)
                except BaseException as exc:
                    if item.future is not None:
                        item.future.set_exception(exc)
                    else:
                        log.info("an agent operation failed on this rank as on rank 0", op=item.name, error=str(exc))
                else:
                    if item.future is not None:
                        item.future.set_result(result)
            elif isinstance(item, Call):
                if item.future.set_running_or_notify_cancel():
                    try:
                        item.future.set_result(item.fn())
                    except BaseException as exc:
                        item.future.set_exception(exc)
            elif isinstance(item, Stop):
                self._shutdown(save=item.save)
                return

    def _follow(self) -> None:
        """A follower rank's loop: rank 0's inbox each turn, then the same step."""
        assert self.store is not None and self.life is not None and self.dist is not None
        while True:
            tick = self.dist.tick()
            assert self.grammars is not None
            self._apply([self.dist.to_item(m, self.grammars) for m in tick.messages])
            if self._stopping:
                return
            self.store.poll_io()
            if self.life.finishing:
                self.life.complete_finished()
            self._step()

    # One step: schedule, execute, update ------------------------------------------------------------

    def _step(self) -> bool:
        plan = self._schedule()
        if plan.empty:
            return False
        assert self.runner is not None
        result = self.runner.execute(plan)
        self._update(result)
        return True

    def _schedule(self) -> StepPlan:
        assert self.admission is not None and self.life is not None
        life = self.life
        admitted, failed = self.scheduler.admit(self.admission.prepare)
        for seq, exc in failed:
            life.fail_or_abandon(seq, exc, "load" if seq.load is not None else "admit")
        for seq in admitted:
            try:
                life.start(seq)
            except Exception as exc:
                life.abandon(seq, exc, "admit")
        self._join_ready()
        # Each decoding sequence writes one token this step: its blocks must cover it first.
        for seq in self.scheduler.by_admission():
            if seq.id in self.scheduler.decoding:  # not preempted while making room for an earlier one
                life.ensure_decode_room(seq)
        return self.scheduler.plan()

    def _update(self, result: StepResult) -> None:
        assert self.publisher is not None and self.life is not None
        life = self.life
        for group, exc in result.failed_groups:
            for seq in self.scheduler.drop_group(group):  # the batch's state is unknown: fail it all
                life.abandon(seq, exc, "decode")
        for seq, exc in result.failed:
            life.abandon(seq, exc, "prefill")
        for _, responses, seconds in result.decoded:
            self.publisher.decode_rate.add(len(responses), seconds)
            self.metrics.tokens.labels("decode").inc(len(responses))
            for response in responses:
                decoding = self.scheduler.decoding.get(response.uid)
                if decoding is None:
                    continue
                decoding.cache_tokens += 1
                try:
                    life.on_token(decoding, response)
                except Exception as exc:
                    life.drop_from_batch(decoding)
                    life.abandon(decoding, exc, "finish")
        for seq, n, seconds in result.prefilled:
            seq.timing.prefill_seconds += seconds
            self.publisher.prefill_rate.add(n, seconds)
            self.metrics.tokens.labels("prefill").inc(n)
            seq.cursor += n
            seq.handle.deliver(PrefillProgress(seq.cursor, len(seq.prompt)))
        self._join_ready()

    def _join_ready(self) -> None:
        """Sequences whose prompt is done join their decode group (its batch made if new)."""
        assert self.runner is not None and self.life is not None
        ready = self.scheduler.prompt_done()
        if not ready:
            return
        for seq in ready:
            seq.cache_tokens = len(seq.prompt)
        for group, members in self.scheduler.place(ready):
            try:
                seconds = self.runner.join(group, members)
            except Exception as exc:
                for seq in members:
                    self.life.abandon(seq, exc, "prefill")
                continue
            self.scheduler.join(group, members)
            for seq in members:
                seq.timing.prefill_seconds += seconds / len(members)

    # A sequence's life --------------------------------------------------------------------------------

    def _shutdown(self, save: bool) -> None:
        """Cancel everything in flight (keeping computed caches), then save every hot agent."""
        assert self.store is not None and self.residency is not None and self.life is not None
        self._stopping = True
        for seq in self.scheduler.all():
            self.life.cancel(seq.handle)
        self.life.complete_finished(wait=True)
        if save:
            for agent_id in self.residency.hot_ids():
                agent = self.store.get(agent_id) if agent_id in self.store else None
                hot = self.residency.get(agent_id)
                if agent is None or hot is None or hot.cache is None:
                    continue
                try:
                    self.store.save(agent, hot.cache)
                except SemanticError as exc:
                    log.error("could not save an agent at shutdown", agent=agent.id, error=str(exc))
        self.store.poll_io()
        self.store.close()
        if self.store.ownership is not None:
            self.store.ownership.release_all()
        if self.dist is not None:
            # Every rank has written its share of every agent before any rank leaves: a rank that
            # exits first would have its launcher stop the others mid-save.
            self.dist.broadcast(b"")
        self._publish(force=True)


def _thread_main(holder: list[Engine]) -> None:
    """Run the engine, then park the thread instead of letting it end.

    A thread that used MLX runs MLX's thread-local destructors when it ends, and they re-enter
    Python; if that happens while the interpreter is exiting, the process aborts ("terminate called
    without an active exception"). A parked daemon thread is simply dropped at exit. The engine is
    released first, so a parked thread holds no model memory.
    """
    engine = holder.pop()
    engine._main()
    del engine
    threading.Event().wait()
