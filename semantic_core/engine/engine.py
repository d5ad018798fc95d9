"""The engine: one model, many agents, one generation thread.

`Engine` owns the model, tokenizer, block pool and agent store. All MLX work (forward passes, cache
surgery, loading and saving tensors) happens on its single generation thread; callers (asyncio
handlers, the TUI, plain scripts) submit a `GenerationRequest` and read events from a handle, or run
agent operations through `call`, which executes between two steps.

Scheduling, per loop turn:
1. take new requests, cancellations and calls from the inbox;
2. admit waiting requests first come first served, while the batch has room: resolve the agent
   (named, longest cached prefix, or new), make its cache hot (a cold agent is read from disk by
   the reader thread meanwhile), trim a divergent history, reserve pool blocks for the prompt;
3. one decode step for every running sequence (mlx-lm's `GenerationBatch`: batched forward pass,
   per-sequence samplers, end-of-turn tokens);
4. at most SEMANTIC_MLX_PREFILL_STEP_SIZE prompt tokens of prefill, shared among the prefilling
   sequences by water-filling (the shortest finishes first, none gets less than an equal share),
   each sequence in its own forward pass so a short prompt is never padded to a long one.
   Sequences whose prompt is done join the decode batch.

So a long prompt delays a running decode by at most one chunk, and a short request that arrives
during a long prefill gets its first token after about one chunk.

Two requests for the same agent at once: the second waits in the queue until the first finishes
(clients that resend a conversation expect it to continue, not to fail); other agents' requests are
admitted past it meanwhile.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from semantic_core.agents.disk import KVGeometry
from semantic_core.agents.prefix_index import common_prefix
from semantic_core.agents.store import Agent, AgentStore
from semantic_core.config import Settings
from semantic_core.engine.block_pool import BlockPool
from semantic_core.engine.chat import RenderedPrompt, render_chat
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.memory import MemoryManager
from semantic_core.engine.operations import AgentOperations
from semantic_core.engine.snapshot import EngineSnapshot, RateMeter
from semantic_core.engine.text_stream import StopMatcher, make_detokenizer_factory
from semantic_core.engine.types import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    GenerationResult,
    PrefillProgress,
    Started,
    StopReason,
    TextDelta,
    Usage,
)
from semantic_core.errors import (
    AgentDamaged,
    AgentNotFound,
    EngineFault,
    EngineStopped,
    InvalidRequest,
    ModelMismatch,
    PoolExhausted,
    PromptTooLong,
    QueueFull,
    SemanticError,
    StorageError,
    StoreFull,
)
from semantic_core.model.loader import LoadedModel, ModelInfo
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
_DONE = object()

# Decode groups (see Engine._group_for): sequences decode in one batch while their cache lengths differ
# by at most this many tokens or this factor; at most this many batches step separately.
# Prompts longer than this (characters) are tokenized on a thread of their own (Engine.render_async).
LARGE_PROMPT_CHARS = 32_000

# Temperatures below this sample greedily (see Engine._validate).
MIN_TEMPERATURE = 1e-5

GROUP_SLACK_TOKENS = 256
GROUP_RATIO = 2.0
MAX_DECODE_GROUPS = 3


# Per-sequence state ----------------------------------------------------------------------------------


@dataclass
class _Seq:
    handle: RequestHandle
    request: GenerationRequest
    submitted: float
    uid: int = -1
    agent: Agent | None = None
    parent: Agent | None = None  # implicit requests: the agent whose cache this one reuses
    created_agent: bool = False
    phase: str = "waiting"  # waiting, loading, prefill, decode, done
    load_future: Future | None = None
    load_target: Agent | None = None
    cached: int = 0  # prompt tokens reused from the cache
    cursor: int = 0  # prompt tokens in the cache so far
    kv: list[Any] | None = None  # the cache during prefill
    cache_tokens: int = 0  # tokens in the cache while decoding
    generated: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    detok: Any = None
    stops: StopMatcher | None = None
    max_tokens: int = 0
    sampler: Any = None
    admitted: float | None = None
    prefill_started: float | None = None
    prefill_seconds: float = 0.0
    first_token_at: float | None = None
    started_event_sent: bool = False
    preempted: bool = False
    # As first admitted (a preempted sequence resumes with its generated tokens as prompt).
    prompt_tokens: int = 0
    reused_tokens: int = 0

    @property
    def prompt(self) -> list[int]:
        return self.request.tokens


# The engine ----------------------------------------------------------------------------------------


class Engine(AgentOperations):
    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        # This engine's metrics (and its API's): never shared with another engine in the process.
        self.metrics = Metrics()
        self._loaded = loaded
        self._inbox: deque[Any] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        # Set when the loop died of an error it could not contain (a bug): probes fail and
        # `semantic serve` exits non-zero, so a supervisor restarts the process.
        self.crash: BaseException | None = None
        self.dead = threading.Event()
        self._stopping = False
        self._stopped = threading.Event()
        self._waiting: deque[_Seq] = deque()
        # Finished sequences whose turn is being made durable before the caller hears of it.
        self._finishing: list[tuple[_Seq, GenerationResult, Future[Any], float]] = []
        self._prefilling: list[_Seq] = []
        self._decoding: dict[int, _Seq] = {}
        self._active_agents: dict[str, _Seq] = {}
        # Decoding sequences in groups of similar cache length, one mlx-lm GenerationBatch each: a batch
        # left-pads every sequence to its longest, so one long history would make every short agent attend
        # over (and hold memory for) all of it. Each group costs one forward pass per step.
        self._groups: list[Any] = []
        self._uids = itertools.count()
        self._samplers: dict[tuple[float, float, int], Any] = {}
        self._prefill_rate = RateMeter()
        self._decode_rate = RateMeter()
        self.tokens_reused = 0
        self.tokens_computed = 0
        self.requests_total = 0
        self._snapshot: EngineSnapshot | None = None
        self._snapshot_at = 0.0
        self._snapshot_dirty = True
        self._listeners: list[Callable[[EngineSnapshot], None]] = []
        self._render_small = ThreadPoolExecutor(max_workers=2, thread_name_prefix="semantic-render")
        self._render_large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-render-large")
        self._decode_threads = settings.mlx_blas_decode_threads
        # One core stays free for MLX's own thread, the event loop and the UI: a BLAS that spreads
        # over every core of a busy machine waits on its slowest thread (measured here: a 2,045-token
        # prefill took 47 s with 2 threads and 20 s with 1 while another process held one core).
        self._prefill_threads = settings.mlx_blas_prefill_threads or max(1, (os.cpu_count() or 1) - 1)
        self._blas_threads_now = 0
        # Set at start():
        self.model: Any = None
        self.tokenizer: Any = None
        self.info: ModelInfo | None = None
        self.pool: BlockPool | None = None
        self.store: AgentStore | None = None
        self.memory: MemoryManager | None = None
        self._detok_factory: Any = None
        self._eos_stops: Any = None

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
        return (self._started.is_set() and self._start_error is None and not self._stopping
                and not self._stopped.is_set())

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
        self._post(("stop", save))
        self._stopped.wait(timeout)
        self.metrics.ready.set(0)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # Submitting ----------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], system: str | None = None) -> RenderedPrompt:
        """Chat template -> tokens (any thread: the tokenizer is not MLX)."""
        return render_chat(self.tokenizer, messages, system)

    def check_prompt_chars(self, chars: int) -> None:
        """Refuse a prompt by its length alone, before the (costly) tokenization: each token holds at
        most `max_token_chars` characters, so more characters than that times the context cannot fit."""
        assert self.info is not None
        bound = self.info.context_length * self.info.max_token_chars
        if chars > bound:
            raise PromptTooLong(-(-chars // self.info.max_token_chars), self.info.context_length,
                                estimated=True)

    async def render_async(self, messages: list[dict[str, str]], system: str | None = None) -> RenderedPrompt:
        """`render` off the event loop, on the engine's own tokenizer threads: large prompts take
        turns on one thread, so a burst of them never delays the small ones (or any other work of
        the default thread pool)."""
        chars = sum(len(m.get("content") or "") for m in messages) + len(system or "")
        self.check_prompt_chars(chars)
        pool = self._render_large if chars > LARGE_PROMPT_CHARS else self._render_small
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, render_chat, self.tokenizer, messages, system)

    def submit(self, request: GenerationRequest, *, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request. Pass `loop` (or use `submit_async`) to consume events with `async for`."""
        self._check_accepting()
        self._validate(request)
        handle = RequestHandle(self, request, loop)
        self._post(("request", handle))
        return handle

    def submit_async(self, request: GenerationRequest) -> RequestHandle:
        return self.submit(request, loop=asyncio.get_running_loop())

    def generate(self, request: GenerationRequest) -> Iterator[Event]:
        """Sync convenience for scripts: iterate the events of one request."""
        return iter(self.submit(request))

    def complete(self, request: GenerationRequest) -> GenerationResult:
        return self.submit(request).wait()

    def queue_depth(self) -> int:
        return len(self._waiting) + sum(1 for item in self._inbox if item[0] == "request")

    def _check_accepting(self) -> None:
        if self._stopping or self._stopped.is_set():
            raise EngineStopped()
        if not self._started.is_set() or self._start_error is not None:
            raise EngineStopped("the engine is not running")

    def _validate(self, req: GenerationRequest) -> None:
        """Refuse (or normalise) anything that could fail inside the loop, where one bad request
        must never stop the engine for everyone: every sampling parameter is checked against the
        model, and every token id against its vocabulary."""
        assert self.info is not None
        if not req.tokens:
            raise InvalidRequest("the prompt is empty")
        limit = self.info.context_length
        if len(req.tokens) >= limit:
            raise PromptTooLong(len(req.tokens), limit)
        vocab = self.info.vocab_size
        if vocab and (min(req.tokens) < 0 or max(req.tokens) >= vocab):
            raise InvalidRequest(f"the prompt holds token ids outside the model's vocabulary (0..{vocab - 1})")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise InvalidRequest("max_tokens: must be an integer of at least 1")
        for name in ("temperature", "top_p"):
            value = getattr(req, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InvalidRequest(f"{name}: must be a finite number")
        if req.temperature < 0:
            raise InvalidRequest("temperature: must be >= 0")
        if req.temperature < MIN_TEMPERATURE:
            # Logits / temperature overflow to inf below ~1e-37 and sampling turns random; far above
            # that the distribution is already a point mass on the argmax: sample greedily.
            req.temperature = 0.0
        if not 0 < req.top_p <= 1:
            raise InvalidRequest("top_p: must be in (0, 1]")
        if isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 0:
            raise InvalidRequest("top_k: must be an integer >= 0")
        if vocab and req.top_k >= vocab:
            req.top_k = 0  # the top `vocab` tokens are all of them: no filter (mlx-lm refuses k >= vocab)
        if len(req.stop_sequences) > 64 or any(not isinstance(x, str) for x in req.stop_sequences):
            raise InvalidRequest("stop_sequences: at most 64 strings")
        if self.queue_depth() >= self.settings.server_max_queue:
            raise QueueFull(f"{self.queue_depth()} requests are waiting; retry shortly")
        if req.agent_id is not None:
            from semantic_core.agents.record import validate_agent_id

            validate_agent_id(req.agent_id)

    # Calls onto the engine thread -------------------------------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float | None = 120.0) -> T:
        """Run `fn` on the engine thread between two steps and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stopped.is_set():
            raise EngineStopped()
        fut: Future[T] = Future()
        self._post(("call", fn, fut))
        return fut.result(timeout)

    async def acall(self, fn: Callable[[], T]) -> T:
        if self._stopped.is_set():
            raise EngineStopped()
        fut: Future[T] = Future()
        self._post(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def _post(self, item: Any) -> None:
        self._inbox.append(item)
        self._wake.set()

    # Snapshots for readers on other threads ----------------------------------------------------------

    def snapshot(self, fresh: bool = False) -> EngineSnapshot:
        """The latest published snapshot (at most ~0.2 s old while generating), or, with `fresh`,
        one taken now between two steps."""
        if fresh and not self._stopped.is_set():
            self.call(lambda: self._publish(force=True))
        snap = self._snapshot
        if snap is None:
            raise EngineStopped("the engine has not started")
        return snap

    def add_listener(self, fn: Callable[[EngineSnapshot], None]) -> None:
        """`fn(snapshot)` runs on the engine thread after each new snapshot: keep it cheap."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[EngineSnapshot], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

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
            self._loop()
        except BaseException as exc:  # a bug the per-request guards did not contain: fail loudly
            self.crash = exc
            log.critical("the engine loop crashed; no request can be served until the process restarts",
                         exc_info=exc)
            with contextlib.suppress(BaseException):
                self._fail_everything(exc)
            self.dead.set()
        finally:
            self.metrics.ready.set(0)
            self._groups = []
            # Work queued with async_eval must finish before this thread ends, or MLX's stream
            # threads are torn down at exit with work in flight (a C++ terminate).
            import mlx.core as mx

            mx.synchronize()
            self._stopped.set()

    def _boot(self) -> None:
        from mlx_lm.generate import StopSequences

        from semantic_core.model import loader

        if self._loaded is None:
            self._loaded = loader.load(self.settings)
        self.model = self._loaded.model
        self.tokenizer = self._loaded.tokenizer
        self.info = self._loaded.info
        s = self.settings
        self.pool = BlockPool.from_budget(s.mlx_cache_budget_mb, s.mlx_block_tokens, self.info.bytes_per_token)
        self.store = AgentStore(
            s.agents_dir, s.quarantine_dir, fingerprint=self.info.fingerprint,
            model_id=self.info.model_id, block_tokens=s.mlx_block_tokens, new_cache=self._new_cache,
            metrics=self.metrics, max_agents=s.agent_max_agents,
            geometry=KVGeometry(self.info.num_layers, self.info.kv_heads, self.info.head_dim,
                                self.info.kv_dtype, self.info.vocab_size),
        )
        self.store.scan()
        self.memory = MemoryManager(self.pool, self.store, s.agent_max_agents_in_memory, self.metrics)
        self._detok_factory = make_detokenizer_factory(self.tokenizer)
        self._eos_stops = StopSequences([(t,) for t in sorted(self.tokenizer.eos_token_ids)])
        log.info(
            "engine ready", model=self.info.model_id, device=self.info.device, weights=self.info.weights,
            blas=self.info.blas, kernels=self.info.kernels, pool_blocks=self.pool.capacity,
            block_tokens=self.pool.block_tokens,
            kv_bytes_per_token=self.info.bytes_per_token, agents=len(self.store),
        )
        self._publish(force=True)

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            if self._stopping:
                return
            assert self.store is not None
            self.store.poll_io()
            if self._finishing:
                self._complete_finished()
            self._admit()
            worked = False
            if self._groups and self._decoding:
                self._blas_phase("decode")
                self._decode_step()
                worked = True
            if self._prefilling:
                self._blas_phase("prefill")
                self._prefill_step()
                worked = True
            self._publish()
            if not worked:
                self._wake.wait(0.05 if (self._waiting or self._has_pending_io()) else 0.5)
                self._wake.clear()

    def _blas_phase(self, phase: str) -> None:
        """Decode matmuls are matrix-vector sized: BLAS worker threads cost more than they bring
        (and spin against MLX's own thread on a small machine); prefill matmuls are large and
        scale with cores. The thread count is switched only between phases, with MLX idle, because
        changing it while MLX's stream thread is inside a BLAS call is not safe."""
        threads = self._decode_threads if phase == "decode" else self._prefill_threads
        if threads == self._blas_threads_now or threads < 1:
            return
        import mlx.core as mx

        from semantic_core.model.blas import set_blas_threads

        mx.synchronize()
        set_blas_threads(threads)
        self._blas_threads_now = threads

    def _has_pending_io(self) -> bool:
        return bool(self._finishing) or any(a.pending_save is not None for a in self.store)  # type: ignore[union-attr]

    def _drain_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            kind = item[0]
            self._snapshot_dirty = True
            if kind == "request":
                handle: RequestHandle = item[1]
                self._waiting.append(_Seq(handle=handle, request=handle.request, submitted=time.monotonic()))
                self.requests_total += 1
            elif kind == "cancel":
                self._cancel(item[1])
            elif kind == "call":
                _, fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)
                self._snapshot_dirty = True
            elif kind == "stop":
                self._shutdown(save=item[1])
                return

    # Admission -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        max_batch = self.settings.mlx_max_batch_size
        ahead: set[str] = set()  # agents of requests earlier in the queue: later ones may not evict them
        for seq in list(self._waiting):
            if len(self._decoding) + len(self._prefilling) >= max_batch:
                break
            protect = self._running_agents() | ahead
            try:
                status = self._prepare(seq, protect)
            except SemanticError as exc:
                self._waiting.remove(seq)
                self._fail(seq, exc)
                continue
            except Exception as exc:
                self._waiting.remove(seq)
                self._abandon(seq, exc, "admit" if seq.load_future is None else "load")
                continue
            if status == "ready":
                self._waiting.remove(seq)
                try:
                    self._start_prefill(seq)
                except Exception as exc:
                    self._abandon(seq, exc, "admit")
                continue
            if status == "blocked":
                break  # first come first served: later requests do not overtake for memory
            for agent in (seq.agent, seq.load_target):
                if agent is not None:
                    ahead.add(agent.id)

    def _running_agents(self) -> set[str]:
        return {s.agent.id for s in (*self._prefilling, *self._decoding.values()) if s.agent is not None}

    def _prepare(self, seq: _Seq, protect: set[str]) -> str:
        """Resolve the agent, make its cache hot and reserve blocks for the prompt.
        Returns "ready", "loading", "busy" or "blocked" (memory)."""
        assert self.store is not None and self.memory is not None and self.pool is not None
        req = seq.request
        if seq.load_future is not None:
            status = self._finish_loading(seq, protect)
            if status != "ready":
                return status
        if seq.agent is None:
            status = self._resolve_agent(seq, protect)
            if status != "ready":
                return status
        agent = seq.agent
        assert agent is not None
        if not agent.hot:
            if agent.on_disk and agent.tokens:
                return self._start_load(seq, agent)
            try:
                self.memory.make_hot_slot(protect | {agent.id})
            except PoolExhausted:
                return self._blocked(agent)
            agent.tokens = []
            agent.cache = self._new_cache()
            agent.changed()
        # Reuse what the cache holds of this prompt; keep at least one token to compute.
        reuse = len(agent.tokens) if seq.preempted else common_prefix(agent.tokens, req.tokens)
        reuse = min(reuse, len(req.tokens) - 1)
        need_tokens = len(req.tokens) + 1
        if not self.memory.fits_ever(need_tokens):
            raise PoolExhausted(
                f"the prompt needs {need_tokens} tokens of KV cache and the whole pool holds "
                f"{self.memory.capacity_tokens()} (SEMANTIC_MLX_CACHE_BUDGET_MB="
                f"{self.settings.mlx_cache_budget_mb:g}); shorten the prompt or raise the budget",
                never_fits=True,
            )
        keep = protect | ({seq.parent.id} if seq.parent else set())
        if reuse < len(agent.tokens):
            self._trim(agent, reuse)
        try:
            self.memory.ensure(agent, need_tokens, protect=keep)
            self.memory.unshare(agent, protect=keep)
        except PoolExhausted:
            return self._blocked(agent)
        seq.cached = reuse
        return "ready"

    def _blocked(self, waiting: Agent | None = None) -> str:
        """Memory is short now. Waiting helps only if something running will finish (the waiting
        request's own agent does not count as something to evict)."""
        assert self.memory is not None
        exclude = {waiting.id} if waiting is not None else set()
        if not self._decoding and not self._prefilling and not self.memory.evictable(exclude):
            raise PoolExhausted(
                "the KV pool is full of pinned agents and nothing can be evicted; unpin or evict an agent, "
                "or raise SEMANTIC_MLX_CACHE_BUDGET_MB"
            )
        return "blocked"

    def _resolve_agent(self, seq: _Seq, protect: set[str]) -> str:
        assert self.store is not None and self.memory is not None
        req = seq.request
        if req.agent_id is not None:
            if req.agent_id in self._active_agents:
                return "busy"
            if req.agent_id in self.store:
                agent = self.store.get(req.agent_id)
                if agent.damaged:
                    raise AgentDamaged(f"agent {agent.id!r} is damaged: {agent.damaged}")
                if not agent.compatible:
                    raise ModelMismatch(
                        f"agent {agent.id!r} was saved with another model; load that model or delete the agent"
                    )
            elif req.create_agent:
                agent = self._new_agent(req.agent_id, protect, system_prompt=req.system_prompt)
                seq.created_agent = True
            else:
                raise AgentNotFound(req.agent_id)
            self._claim(seq, agent)
            return "ready"

        # No agent named: the longest cached prefix among idle agents, else a new agent.
        match = self.store.best_prefix(req.tokens)
        if match is not None and match.length >= self.store.index.block_tokens:
            cand = self.store.get(match.agent_id)
            if not cand.hot:
                seq.parent = cand
                return self._start_load(seq, cand)
            if match.length >= len(cand.tokens) or 0 < cand.record.reply_start <= match.length:
                seq.parent = None
                self._claim(seq, cand)  # the same conversation, resent with a new turn
                return "ready"
            try:
                self.memory.make_hot_slot(protect | {cand.id})
            except PoolExhausted:
                return self._blocked()
            child = self._new_agent(None, protect | {cand.id}, system_prompt=req.system_prompt,
                                    forked_from=cand.id)
            try:
                self._fork_into(cand, child, match.length)
            except PoolExhausted:
                self.memory.release(child)
                self.store.forget(child)
                return self._blocked()
            seq.parent = cand
            seq.created_agent = True
            self._claim(seq, child)
            return "ready"
        agent = self._new_agent(None, protect, system_prompt=req.system_prompt)
        seq.created_agent = True
        self._claim(seq, agent)
        return "ready"

    def _new_agent(self, agent_id: str | None, protect: set[str], **fields: Any) -> Agent:
        """A new agent; when the store is full (SEMANTIC_AGENT_MAX_AGENTS), the least recently used
        agent a stateless client left behind (created without a name) is deleted to make room."""
        assert self.store is not None and self.memory is not None
        try:
            return self.store.create(agent_id, **fields)
        except StoreFull:
            victim = self.store.recyclable(protect | set(self._active_agents) | self._loading_agents())
            if victim is None:
                raise
            log.info("store full: recycling the least recently used unnamed agent", agent=victim.id)
            self.memory.release(victim)
            self.store.forget(victim)
            return self.store.create(agent_id, **fields)

    def _loading_agents(self) -> set[str]:
        """Agents whose files are being read for a waiting request (they may not be deleted)."""
        return {s.load_target.id for s in self._waiting if s.load_future is not None and s.load_target is not None}

    def _claim(self, seq: _Seq, agent: Agent) -> None:
        seq.agent = agent
        self._active_agents[agent.id] = seq
        agent.touch()

    def _start_load(self, seq: _Seq, agent: Agent) -> str:
        """Read the agent's file on the reader thread; the loop wakes when it is done."""
        assert self.store is not None
        fut = self.store.read_async(agent)
        fut.add_done_callback(lambda _: self._wake.set())
        seq.load_future = fut
        seq.load_target = agent
        seq.phase = "loading"
        return "loading"

    def _finish_loading(self, seq: _Seq, protect: set[str]) -> str:
        """Turn a finished read into a hot cache once the pool has room for it."""
        assert self.store is not None and self.memory is not None
        fut, target = seq.load_future, seq.load_target
        assert fut is not None and target is not None
        if not fut.done():
            return "loading"
        if target.id not in self.store or self.store.get(target.id) is not target:
            # Deleted while its file was read (only an implicit candidate can be: a claimed agent
            # cannot be deleted): resolve the request again without it.
            seq.load_future = seq.load_target = None
            seq.parent = None
            seq.phase = "waiting"
            return "waiting"
        if target.hot:  # loaded meanwhile by an agent operation
            seq.load_future = seq.load_target = None
            seq.phase = "waiting"
            return "ready"
        if fut.exception() is None:
            tokens = len(fut.result()[0].tokens)
            if not self.memory.fits_ever(tokens + 1):
                seq.load_future = seq.load_target = None
                raise PoolExhausted(
                    f"agent {target.id!r} holds {tokens} tokens of KV cache, more than the whole pool "
                    f"({self.memory.capacity_tokens()} tokens); raise SEMANTIC_MLX_CACHE_BUDGET_MB",
                    never_fits=True,
                )
            try:
                self.memory.make_hot_slot(protect | {target.id})
                self.memory.ensure(target, tokens, protect=protect)
            except PoolExhausted:
                self.memory.release(target)
                return self._blocked(target)
        seq.load_future = seq.load_target = None
        seq.phase = "waiting"
        try:
            self.store.finish_load(target, fut)
        except SemanticError:
            self.memory.release(target)
            if seq.agent is target:
                raise
            seq.parent = None  # the candidate is unusable: resolve again without it
            return "waiting"
        target.touch()
        return "ready"

    def _fork_into(self, parent: Agent, child: Agent, length: int) -> None:
        """Child shares the parent's first `length` tokens (views of its arrays; copy on write)."""
        assert self.memory is not None and self.store is not None
        from mlx_lm.models.cache import KVCache

        assert parent.cache is not None
        if length == 0:
            self.store.set_tokens(child, [], self._new_cache())
            return
        caches = []
        for layer in parent.cache:
            c = KVCache()
            c.keys = layer.keys[..., :length, :]
            c.values = layer.values[..., :length, :]
            c.offset = length
            caches.append(c)
        self.memory.fork_blocks(parent, child, length)
        self.store.set_tokens(child, list(parent.tokens[:length]), caches)
        child.record.messages = []

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def _trim(self, agent: Agent, length: int) -> None:
        """Forget cached tokens after `length` (an edited earlier turn, or a retried request)."""
        assert self.memory is not None and self.store is not None and agent.cache is not None
        for layer in agent.cache:
            layer.trim(layer.offset - length)
        self.store.set_tokens(agent, agent.tokens[:length], agent.cache)
        self.memory.shrink(agent, length)

    # Prefill ---------------------------------------------------------------------------------------

    def _start_prefill(self, seq: _Seq) -> None:
        agent = seq.agent
        assert agent is not None and agent.cache is not None
        req = seq.request
        now = time.monotonic()
        seq.admitted = now
        seq.phase = "prefill"
        seq.kv = agent.cache
        agent.cache = None
        agent.running = True
        seq.cursor = seq.cached
        if not seq.preempted:
            seq.detok = self._detok_factory()
            seq.stops = StopMatcher(req.stop_sequences)
            seq.max_tokens = min(req.max_tokens, self.info.context_length - len(req.tokens))  # type: ignore[union-attr]
            seq.sampler = self._sampler(req.temperature, req.top_p, req.top_k)
            reused = seq.cached
            computed = len(req.tokens) - reused
            seq.prompt_tokens, seq.reused_tokens = len(req.tokens), reused
            self.tokens_reused += reused
            self.tokens_computed += computed
            agent.reused_tokens += reused
            agent.computed_tokens += computed
            self.metrics.tokens.labels("reused").inc(reused)
            self.metrics.cache_hits.labels("hit" if reused > 0 else "miss").inc()
            if not seq.started_event_sent:
                seq.started_event_sent = True
                seq.handle._push(Started(agent.id, len(req.tokens), reused, seq.created_agent))
        seq.prefill_started = now
        if seq.cursor >= len(req.tokens) - 1:
            self._join_decode([seq])
        else:
            self._prefilling.append(seq)

    def _prefill_step(self) -> None:
        import mlx.core as mx

        budget = self.settings.mlx_prefill_step_size
        order = sorted(self._prefilling, key=lambda s: len(s.prompt) - 1 - s.cursor)
        ready: list[_Seq] = []
        for i, seq in enumerate(order):
            remaining = len(seq.prompt) - 1 - seq.cursor
            share = max(budget // (len(order) - i), 1)
            n = min(remaining, share)
            if n <= 0:
                ready.append(seq)
                continue
            t0 = time.perf_counter()
            try:
                chunk = mx.array([seq.prompt[seq.cursor : seq.cursor + n]])
                self.model(chunk, cache=seq.kv)
                mx.eval([c.state for c in seq.kv])
            except Exception as exc:
                self._prefilling.remove(seq)
                self._abandon(seq, exc, "prefill")
                continue
            dt = time.perf_counter() - t0
            seq.prefill_seconds += dt
            self._prefill_rate.add(n, dt)
            self.metrics.tokens.labels("prefill").inc(n)
            seq.cursor += n
            budget -= n
            seq.handle._push(PrefillProgress(seq.cursor, len(seq.prompt)))
            if seq.cursor >= len(seq.prompt) - 1:
                ready.append(seq)
            if budget <= 0:
                break
        if ready:
            for seq in ready:
                self._prefilling.remove(seq)
            self._join_decode(ready)
            mx.clear_cache()

    def _prune_groups(self) -> None:
        """Drop decode groups emptied by finishes, cancellations or preemptions (never extend an empty one)."""
        self._groups = [g for g in self._groups if len(g) > 0]

    def _join_decode(self, seqs: list[_Seq]) -> None:
        self._prune_groups()
        for seq in seqs:
            seq.uid = next(self._uids)
            seq.cache_tokens = len(seq.prompt)
        placed: dict[int, list[_Seq]] = {}
        for seq in sorted(seqs, key=lambda s: s.cache_tokens):
            index = self._group_for(seq.cache_tokens, placed)
            placed.setdefault(index, []).append(seq)
        for index, members in sorted(placed.items()):
            try:
                batch = self._make_batch(members)
                if index < len(self._groups):
                    self._groups[index].extend(batch)
                else:
                    self._groups.append(batch)
            except Exception as exc:
                for seq in members:
                    self._abandon(seq, exc, "prefill")
                continue
            for seq in members:
                seq.phase = "decode"
                self._decoding[seq.uid] = seq

    def _group_lengths(self, group: Any) -> list[int]:
        return [self._decoding[uid].cache_tokens for uid in group.uids if uid in self._decoding]

    def _group_for(self, tokens: int, placed: dict[int, list[_Seq]]) -> int:
        """The decode group a sequence of `tokens` cached tokens joins (len(self._groups) for a new one).

        A group takes it when padding stays small: the lengths differ by at most
        GROUP_SLACK_TOKENS or by a factor of GROUP_RATIO. Past MAX_DECODE_GROUPS the closest group
        takes it anyway (each group costs a forward pass per step).
        """
        def spread(index: int) -> tuple[int, int]:
            lengths = self._group_lengths(self._groups[index]) if index < len(self._groups) else []
            lengths += [s.cache_tokens for s in placed.get(index, [])]
            return (min(lengths), max(lengths)) if lengths else (tokens, tokens)

        candidates = range(max(len(self._groups), max(placed, default=-1) + 1))
        best, best_gap = None, None
        for index in candidates:
            low, high = spread(index)
            low, high = min(low, tokens), max(high, tokens)
            gap = high - low
            fits = gap <= GROUP_SLACK_TOKENS or high <= GROUP_RATIO * low
            if fits and (best_gap is None or gap < best_gap):
                best, best_gap = index, gap
        if best is not None:
            return best
        count = len(candidates)
        if count < MAX_DECODE_GROUPS:
            return count
        return min(candidates, key=lambda i: abs(sum(spread(i)) / 2 - tokens))

    def _make_batch(self, seqs: list[_Seq]) -> Any:
        import mlx.core as mx
        from mlx_lm.generate import GenerationBatch

        n_layers = self.info.num_layers  # type: ignore[union-attr]
        merged = [type(seqs[0].kv[i]).merge([s.kv[i] for s in seqs]) for i in range(n_layers)]  # type: ignore[index]
        for seq in seqs:
            seq.kv = None
        t0 = time.perf_counter()
        batch = GenerationBatch(
            self.model,
            [s.uid for s in seqs],
            mx.array([s.prompt[-1] for s in seqs]),
            merged,
            [list(s.prompt[:-1]) for s in seqs],
            [s.sampler for s in seqs],
            self._sampler(0.0, 1.0, 0),
            [[] for _ in seqs],
            [self._eos_stops for _ in seqs],
            [max(s.max_tokens - len(s.generated), 1) for s in seqs],
        )
        dt = time.perf_counter() - t0
        for seq in seqs:
            seq.prefill_seconds += dt / len(seqs)
        return batch

    # Decode ----------------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        assert self.memory is not None
        # Each running sequence writes one token this step: its blocks must cover it first.
        for seq in sorted(self._decoding.values(), key=lambda s: s.admitted or 0):
            if seq.uid not in self._decoding:
                continue  # preempted while making room for an earlier one
            self._ensure_decode_room(seq)
        if not self._decoding:
            return
        self._prune_groups()  # making room may have preempted a group's last sequence
        for group in list(self._groups):
            t0 = time.perf_counter()
            try:
                responses = group.next()
            except Exception as exc:
                # The batch's state is unknown now: every sequence in it fails, the rest go on.
                self._groups = [g for g in self._groups if g is not group]
                for uid in list(group.uids):
                    seq = self._decoding.pop(uid, None)
                    if seq is not None:
                        self._abandon(seq, exc, "decode")
                continue
            dt = time.perf_counter() - t0
            self._decode_rate.add(len(responses), dt)
            self.metrics.tokens.labels("decode").inc(len(responses))
            for r in responses:
                seq = self._decoding.get(r.uid)
                if seq is None:
                    continue
                seq.cache_tokens += 1
                try:
                    self._on_token(seq, r, dt)
                except Exception as exc:
                    self._drop_from_batch(seq)
                    self._abandon(seq, exc, "finish")

    def _ensure_decode_room(self, seq: _Seq) -> None:
        assert self.memory is not None and seq.agent is not None
        protect = self._running_agents()
        while True:
            try:
                self.memory.ensure(seq.agent, seq.cache_tokens + 1, protect=protect)
                return
            except PoolExhausted:
                victim = self._preemption_victim(exclude=seq)
                if victim is None:
                    log.warning("KV budget full: stopping the only running sequence early",
                                agent=seq.agent.id, tokens=seq.cache_tokens)
                    self._remove_from_batch(seq, "max_tokens", None)
                    return
                self._preempt(victim)

    def _preemption_victim(self, exclude: _Seq) -> _Seq | None:
        others = [s for s in self._decoding.values() if s is not exclude]
        return max(others, key=lambda s: s.admitted or 0) if others else None

    def _preempt(self, seq: _Seq) -> None:
        """Make room by saving a running sequence to disk; it resumes from there later."""
        assert self.memory is not None and self.store is not None and seq.agent is not None
        agent = seq.agent
        cache, tokens = self._extract(seq)
        agent.running = False
        self.store.set_tokens(agent, tokens, cache)
        log.info("preempting a sequence to free KV blocks", agent=agent.id, tokens=len(tokens))
        try:
            self.memory.evict(agent, reason="preempt")
        except StorageError as exc:
            # It cannot be parked on disk: end its answer here rather than lose what it has.
            log.error("could not preempt a sequence; stopping it early", agent=agent.id, error=str(exc))
            agent.running = True  # _finish expects a running agent
            self._finish(seq, "max_tokens", None, cache, tokens)
            return
        seq.preempted = True
        seq.phase = "waiting"
        # Resume: the cache holds every token so far; the last one is fed again for its logits.
        seq.request = replace(seq.request, tokens=list(tokens))
        self._waiting.appendleft(seq)

    def _extract(self, seq: _Seq) -> tuple[list[Any], list[int]]:
        gen = next(g for g in self._groups if seq.uid in g.uids)
        idx = gen.uids.index(seq.uid)
        cache = gen.extract_cache(idx)
        tokens = list(gen.tokens[idx])
        gen.filter([i for i in range(len(gen.uids)) if i != idx])
        del self._decoding[seq.uid]
        return cache, tokens

    def _on_token(self, seq: _Seq, r: Any, step_seconds: float) -> None:
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.time_to_first_token.observe(now - seq.submitted)
        seq.generated.append(int(r.token))
        if r.finish_reason == "stop":  # an end-of-turn token: not part of the text
            self._finish(seq, "end_turn", None, r.prompt_cache, list(r.all_tokens))
            return
        seq.detok.add_token(int(r.token))
        self._emit(seq, seq.detok.last_segment)
        if seq.stops.matched is not None:
            cache, tokens = (r.prompt_cache, list(r.all_tokens)) if r.finish_reason else self._extract(seq)
            self._finish(seq, "stop_sequence", seq.stops.matched, cache, tokens)
        elif r.finish_reason == "length":
            self._finish(seq, "max_tokens", None, r.prompt_cache, list(r.all_tokens))

    def _emit(self, seq: _Seq, text: str) -> None:
        if not text:
            return
        out = seq.stops.feed(text)
        if out:
            seq.text_parts.append(out)
            seq.handle._push(TextDelta(out))

    def _remove_from_batch(self, seq: _Seq, reason: StopReason, stop: str | None) -> None:
        cache, tokens = self._extract(seq)
        self._finish(seq, reason, stop, cache, tokens)

    def _finish(self, seq: _Seq, reason: StopReason, stop: str | None, cache: list[Any], tokens: list[int]) -> None:
        assert self.store is not None and self.memory is not None and seq.agent is not None
        self._decoding.pop(seq.uid, None)
        if reason != "stop_sequence" and seq.detok is not None:
            seq.detok.finalize()
            self._emit(seq, seq.detok.last_segment)
            tail = seq.stops.flush() if seq.stops else ""
            if tail:
                seq.text_parts.append(tail)
                seq.handle._push(TextDelta(tail))
        agent = seq.agent
        agent.running = False
        self.store.set_tokens(agent, tokens, cache)
        self.memory.shrink(agent, len(tokens))
        now = time.monotonic()
        ttft = (seq.first_token_at - seq.submitted) if seq.first_token_at else None
        decode_seconds = (now - seq.first_token_at) if seq.first_token_at else 0.0
        usage = Usage(
            prompt_tokens=seq.prompt_tokens,
            cached_tokens=seq.reused_tokens,
            computed_tokens=seq.prompt_tokens - seq.reused_tokens,
            output_tokens=len(seq.generated),
        )
        result = GenerationResult(
            agent_id=agent.id, text="".join(seq.text_parts), token_ids=list(seq.generated), stop_reason=reason,
            stop_sequence=stop, usage=usage, time_to_first_token=ttft,
            prefill_seconds=seq.prefill_seconds, decode_seconds=decode_seconds,
            queued_seconds=(seq.admitted or now) - seq.submitted,
        )
        self._record_turn(seq, result)
        self._release_claim(seq)
        # The answer is complete only once its turn is on disk: the record first (small, fsync'd on
        # the journal thread), the tensors after it on the writer thread.
        journal = self.store.journal_async(agent)
        journal.add_done_callback(lambda _: self._wake.set())
        self._finishing.append((seq, result, journal, time.perf_counter()))
        if self.settings.agent_save_on_finish:
            self._save_quietly(agent)
        self.metrics.generations.labels(reason).inc()
        seq.phase = "done"
        self._snapshot_dirty = True

    def _complete_finished(self, wait: bool = False) -> None:
        """Answer the requests whose turns are durable now (or were not saved: then they say so)."""
        pending = []
        for seq, result, journal, since in self._finishing:
            if not journal.done() and not wait:
                pending.append((seq, result, journal, since))
                continue
            try:
                journal.result()
            except Exception as exc:
                result.turn_saved = False
                result.save_error = exc.message if isinstance(exc, SemanticError) else type(exc).__name__
                log.error("a finished turn could not be saved; the client is told", agent=result.agent_id,
                          error=result.save_error)
            result.durable_seconds = time.perf_counter() - since
            self.metrics.turn_durable_seconds.observe(result.durable_seconds)
            seq.handle._push(Finished(result))
        self._finishing = pending

    def _record_turn(self, seq: _Seq, result: GenerationResult) -> None:
        agent = seq.agent
        assert agent is not None
        req = seq.request
        if req.messages is not None:
            messages = [dict(m) for m in req.messages]
            answer: dict[str, Any] = {"role": "assistant", "content": req.continues_text + result.text}
            if messages and messages[-1].get("role") == "assistant":
                messages[-1] = answer
            else:
                messages.append(answer)
            # How the answer was made, so a UI can show it again after a restart.
            answer["meta"] = {
                "stop_reason": result.stop_reason, "output_tokens": result.usage.output_tokens,
                "prompt_tokens": result.usage.prompt_tokens, "cached_tokens": result.usage.cached_tokens,
                "ttft": round(result.time_to_first_token, 4) if result.time_to_first_token else None,
                "decode_tps": round(result.decode_tokens_per_second, 2),
            }
            if result.stop_reason == "cancelled":
                answer["cancelled"] = True
            agent.record.messages = messages
        if req.system_prompt is not None:
            agent.record.system_prompt = req.system_prompt
        agent.record.reply_start = seq.prompt_tokens
        agent.record.revision += 1
        agent.messages_loaded = True
        agent.touch()
        agent.changed()

    def _save_quietly(self, agent: Agent) -> None:
        assert self.store is not None
        try:
            self.store.save_async(agent)
        except SemanticError as exc:
            log.error("could not start saving an agent", agent=agent.id, error=str(exc))

    def _release_claim(self, seq: _Seq) -> None:
        if seq.agent is not None and self._active_agents.get(seq.agent.id) is seq:
            del self._active_agents[seq.agent.id]

    # Cancellation and failure ------------------------------------------------------------------------

    def _cancel(self, handle: RequestHandle) -> None:
        for seq in list(self._waiting):
            if seq.handle is handle:
                self._waiting.remove(seq)
                self._release_claim(seq)
                self._finish_unstarted(seq)
                return
        for seq in list(self._prefilling):
            if seq.handle is handle:
                # Keep what was computed: the cache holds the prompt up to the cursor.
                self._prefilling.remove(seq)
                agent = seq.agent
                assert agent is not None and self.store is not None and self.memory is not None
                agent.running = False
                self.store.set_tokens(agent, list(seq.prompt[: seq.cursor]), seq.kv)
                self.memory.shrink(agent, seq.cursor)
                seq.kv = None
                self._release_claim(seq)
                self._finish_unstarted(seq)
                return
        for seq in list(self._decoding.values()):
            if seq.handle is handle:
                self._remove_from_batch(seq, "cancelled", None)
                return

    def _finish_unstarted(self, seq: _Seq) -> None:
        now = time.monotonic()
        result = GenerationResult(
            agent_id=seq.agent.id if seq.agent else "", text="", token_ids=[], stop_reason="cancelled",
            stop_sequence=None, usage=Usage(len(seq.prompt), 0, 0, 0), time_to_first_token=None,
            prefill_seconds=seq.prefill_seconds, decode_seconds=0.0, queued_seconds=now - seq.submitted,
        )
        self.metrics.generations.labels("cancelled").inc()
        seq.handle._push(Finished(result))

    def _fail(self, seq: _Seq, exc: Exception) -> None:
        self._release_claim(seq)
        if seq.created_agent and seq.agent is not None and not seq.agent.tokens and self.store is not None:
            with contextlib.suppress(SemanticError):
                self.memory.release(seq.agent)  # type: ignore[union-attr]
                self.store.forget(seq.agent)
        seq.phase = "done"
        seq.handle._push(Failed(exc))

    def _abandon(self, seq: _Seq, exc: BaseException, stage: str) -> None:
        """An unexpected error while serving one sequence: fail that request alone and put its
        agent back into a state the engine can trust (what its file holds), so that no other
        request, and no later one, is affected."""
        agent = seq.agent or seq.load_target
        log.error("a request failed inside the engine; the engine goes on", stage=stage,
                  agent=agent.id if agent else None, exc_info=exc)
        self.metrics.engine_failures.labels(stage).inc()
        with contextlib.suppress(ValueError):
            self._prefilling.remove(seq)
        self._decoding.pop(seq.uid, None)
        seq.kv = None
        self._release_claim(seq)
        for target in {id(a): a for a in (seq.agent, seq.load_target) if a is not None}.values():
            try:
                self._reset_agent(target, forget=seq.created_agent and target is seq.agent)
            except Exception:  # the reset itself failed: the agent is unusable, never the engine
                log.exception("could not reset an agent after a failure", agent=target.id)
        self._snapshot_dirty = True
        if seq.phase != "done":
            seq.phase = "done"
            seq.handle._push(Failed(EngineFault(
                f"the request failed inside the engine while {_STAGE_WORDS.get(stage, stage)}; the agent keeps "
                "its last saved state and the engine goes on serving (request id "
                f"{seq.request.request_id or '-'})"
            )))

    def _reset_agent(self, agent: Agent, *, forget: bool = False) -> None:
        """Drop an agent's in-memory state after a failure; it continues from its file (or empty)."""
        assert self.store is not None and self.memory is not None
        agent.running = False
        agent.cache = None
        self.memory.release(agent)
        if agent.id not in self.store or self.store.get(agent.id) is not agent:
            return
        if forget and not agent.on_disk:
            self.store.forget(agent)
            return
        self.store.reset_to_disk(agent)

    def _drop_from_batch(self, seq: _Seq) -> None:
        """Take a sequence out of its decode group without reading its cache."""
        for group in self._groups:
            if seq.uid in group.uids:
                idx = group.uids.index(seq.uid)
                with contextlib.suppress(Exception):
                    group.filter([i for i in range(len(group.uids)) if i != idx])
        self._decoding.pop(seq.uid, None)

    def _fail_everything(self, exc: BaseException) -> None:
        err = exc if isinstance(exc, Exception) else EngineStopped()
        for seq in [*self._waiting, *self._prefilling, *self._decoding.values(),
                    *(f[0] for f in self._finishing)]:
            seq.handle._push(Failed(err))
        self._finishing = []
        self._waiting.clear()
        self._prefilling.clear()
        self._decoding.clear()

    def _shutdown(self, save: bool) -> None:
        """Cancel everything in flight (keeping computed caches), then save every hot agent."""
        self._stopping = True
        for seq in list(self._waiting) + list(self._prefilling) + list(self._decoding.values()):
            self._cancel(seq.handle)
        self._complete_finished(wait=True)
        assert self.store is not None
        if save:
            for agent in self.store.hot_agents():
                try:
                    self.store.save(agent)
                except SemanticError as exc:
                    log.error("could not save an agent at shutdown", agent=agent.id, error=str(exc))
        self.store.poll_io()
        self.store.close()
        self._render_small.shutdown(wait=False)
        self._render_large.shutdown(wait=False)
        self._publish(force=True)

    # Metrics and snapshots -------------------------------------------------------------------------

    def _sampler(self, temperature: float, top_p: float, top_k: int) -> Any:
        """One sampler object per distinct setting, so a batch that shares settings samples in one call."""
        from mlx_lm.sample_utils import make_sampler

        key = (float(temperature), float(top_p), int(top_k))
        if key not in self._samplers:
            self._samplers[key] = make_sampler(temp=key[0], top_p=key[1] if key[1] < 1.0 else 0.0, top_k=key[2])
        return self._samplers[key]

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        busy = bool(self._decoding or self._prefilling)
        if not force and (now - self._snapshot_at < 0.2 if busy else not self._snapshot_dirty):
            return
        self._snapshot_dirty = False
        assert self.store is not None and self.pool is not None and self.memory is not None
        self._snapshot_at = now
        agents = tuple(self._info(a) for a in sorted(self.store, key=lambda a: a.id))
        stats = self.pool.stats()
        prefill_tps, decode_tps = self._prefill_rate.value(), self._decode_rate.value()
        snap = EngineSnapshot(
            taken_at=time.time(), agents=agents, pool_capacity=stats.capacity, pool_used=stats.used,
            pool_shared=stats.shared, block_tokens=stats.block_tokens, bytes_per_block=stats.bytes_per_block,
            hot_agents=sum(1 for a in agents if a.tier == "hot"), max_hot=self.memory.max_hot,
            running=len(self._decoding), prefilling=len(self._prefilling), waiting=len(self._waiting),
            tokens_reused=self.tokens_reused, tokens_computed=self.tokens_computed,
            prefill_tps=prefill_tps, decode_tps=decode_tps, evictions=self.memory.evictions,
            saves=self.store.saves_total, loads=self.store.loads_total, quarantined=self.store.quarantined_total,
            disk_bytes=self.store.disk_bytes(), requests_total=self.requests_total,
            can_serve=self.memory.can_serve(),
            block_map=self.pool.block_map(),
        )
        self._snapshot = snap
        self.metrics.pool_utilization.set(snap.utilization)
        self.metrics.pool_blocks.labels("used").set(stats.used)
        self.metrics.pool_blocks.labels("free").set(stats.free)
        self.metrics.pool_blocks.labels("shared").set(stats.shared)
        for tier in ("hot", "cold", "damaged"):
            self.metrics.agents.labels(tier).set(sum(1 for a in agents if a.tier == tier))
        self.metrics.agents_active.set(len(self._active_agents))
        self.metrics.ready.set(1 if snap.can_serve and not self._stopping else 0)
        self.metrics.batch_size.set(len(self._decoding))
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.tokens_per_second.labels("prefill").set(prefill_tps)
        self.metrics.tokens_per_second.labels("decode").set(decode_tps)
        for fn in list(self._listeners):
            try:
                fn(snap)
            except Exception:  # a listener must never break generation
                log.exception("snapshot listener failed")


_STAGE_WORDS = {
    "admit": "admitting it", "load": "loading its agent", "prefill": "reading the prompt",
    "decode": "generating", "finish": "finishing the answer",
}


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
