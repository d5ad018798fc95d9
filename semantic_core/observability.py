"""Logs and metrics: structlog configuration, and the Prometheus metrics of one engine and its API.

Metrics belong to an instance, never to the process: each `Engine` makes its own `Metrics` (one
`CollectorRegistry` with every metric object), and the API built on that engine counts its requests
there and serves it on /metrics. Two servers in one process, a TUI started after a server, or a test
after another, never see each other's numbers. The metric names are the same for every instance.

Logging: one renderer for structlog and the standard library (uvicorn included). Tracebacks are
rendered as plain text, without local variables (a Rich traceback with locals prints API keys from
the ASGI scope and the prompt text, and takes seconds to render), in both console and JSON mode.
Records pass through a queue to a listener thread, so a slow terminal or a long traceback never
blocks the event loop that logged it.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
from typing import Any, TextIO

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_IO_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric of one engine and the API served on it, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # HTTP
        self.requests = Counter(
            "semantic_request_total",
            "HTTP requests by route template and status.",
            ["method", "path", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "semantic_request_duration_seconds",
            "HTTP request duration by route template.",
            ["method", "path"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge("semantic_requests_in_flight", "HTTP requests being served.", registry=r)
        self.rate_limited = Counter(
            "semantic_rate_limited_total", "Requests refused by the rate limiter.", ["scope"], registry=r
        )
        # Engine
        self.time_to_first_token = Histogram(
            "semantic_time_to_first_token_seconds",
            "From submission to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "semantic_tokens_total", "Tokens processed, by phase (prefill, decode, reused).", ["phase"], registry=r
        )
        self.tokens_per_second = Gauge(
            "semantic_tokens_per_second", "Recent throughput (tokens/s) by phase.", ["phase"], registry=r
        )
        self.batch_size = Gauge("semantic_batch_size", "Sequences decoding together now.", registry=r)
        self.queue_depth = Gauge("semantic_queue_depth", "Requests waiting to be admitted.", registry=r)
        self.generations = Counter(
            "semantic_generations_total", "Finished generations by stop reason.", ["stop_reason"], registry=r
        )
        self.engine_failures = Counter(
            "semantic_engine_failures_total",
            "Requests or agents failed by an unexpected error while the engine kept running, by stage.",
            ["stage"],
            registry=r,
        )
        # Agents and the block pool
        self.pool_utilization = Gauge(
            "semantic_pool_utilization_ratio", "Fraction of KV blocks in use (0..1).", registry=r
        )
        self.pool_blocks = Gauge("semantic_pool_blocks", "KV blocks by state.", ["state"], registry=r)
        self.agents = Gauge("semantic_agents", "Agents by tier.", ["tier"], registry=r)
        self.agents_active = Gauge("semantic_agents_active", "Agents generating now.", registry=r)
        self.cache_hits = Counter(
            "semantic_cache_hit_total",
            "Requests by cache outcome (hit: some prompt reused; miss: none).",
            ["result"],
            registry=r,
        )
        self.evictions = Counter("semantic_evictions_total", "Agents evicted from memory.", ["reason"], registry=r)
        self.saves = Counter("semantic_agent_saves_total", "Agent saves by outcome.", ["result"], registry=r)
        self.loads = Counter("semantic_agent_loads_total", "Agent loads from disk by outcome.", ["result"], registry=r)
        self.quarantined = Counter(
            "semantic_quarantined_files_total",
            "Cache files that failed verification and were moved aside.",
            registry=r,
        )
        self.disk_bytes = Gauge("semantic_cache_disk_bytes", "Bytes of saved agents on disk.", registry=r)
        self.handoffs = Counter(
            "semantic_cluster_handoffs_total",
            "In a cluster: agents moved between live instances, by direction (taken: from another "
            "instance, released: to another).",
            ["direction"],
            registry=r,
        )
        self.save_seconds = Histogram(
            "semantic_agent_save_seconds",
            "Time to write one agent to disk.",
            buckets=_IO_BUCKETS,
            registry=r,
        )
        self.turn_durable_seconds = Histogram(
            "semantic_turn_durable_seconds",
            "From the end of an answer to its turn being on disk (fsync'd), before the response completes.",
            buckets=_IO_BUCKETS,
            registry=r,
        )
        self.load_seconds = Histogram(
            "semantic_agent_load_seconds",
            "Time to read and verify one agent from disk.",
            buckets=_IO_BUCKETS,
            registry=r,
        )
        self.ready = Gauge(
            "semantic_ready", "1 when the engine can serve (model loaded, pool not stuck full).", registry=r
        )
        # Labelled series exist from the start (at 0), so rate() and increase() see their first event.
        for phase in ("prefill", "decode", "reused"):
            self.tokens.labels(phase)
            self.tokens_per_second.labels(phase)
        for result in ("hit", "miss"):
            self.cache_hits.labels(result)
        for reason in ("pool", "max_agents", "manual", "preempt"):
            self.evictions.labels(reason)
        for result in ("ok", "error"):
            self.saves.labels(result)
        for result in ("ok", "error", "mismatch"):
            self.loads.labels(result)
        for scope in ("key", "client", "global"):
            self.rate_limited.labels(scope)
        for reason in ("end_turn", "max_tokens", "stop_sequence", "tool_use", "cancelled"):
            self.generations.labels(reason)
        for tier in ("hot", "cold", "damaged"):
            self.agents.labels(tier)
        for state in ("used", "free", "shared"):
            self.pool_blocks.labels(state)
        for stage in ("admit", "load", "prefill", "decode", "finish"):
            self.engine_failures.labels(stage)

    def requests_served(self) -> float:
        """Every HTTP request counted so far (all routes and statuses)."""
        return sum(s.value for family in self.requests.collect() for s in family.samples if s.name.endswith("_total"))


# Logging -------------------------------------------------------------------------------------------

_listener: logging.handlers.QueueListener | None = None


def _plain_traceback(sio: TextIO, exc_info: Any) -> None:
    """The standard library's traceback text: frames and source lines, never local variables."""
    import traceback

    sio.write("\n" + "".join(traceback.format_exception(*exc_info)).rstrip("\n"))


def _stop_listener() -> None:
    global _listener
    if _listener is not None:
        try:
            _listener.stop()
        except Exception:  # a log thread must never make exit fail
            pass
        _listener = None


atexit.register(_stop_listener)


def configure_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    *,
    json: bool | None = None,
    handler: logging.Handler | None = None,
) -> None:
    """Route stdlib logging (uvicorn included) and structlog through one renderer.

    PRODUCTION means JSON lines at INFO; anything else is a console renderer at that level. A UI
    passes its own `handler` so that no log line is ever written over its screen. Calling it again
    replaces the previous configuration (the previous handler is flushed and detached).
    """
    global _listener
    json = (level.upper() == "PRODUCTION") if json is None else json
    numeric = logging.INFO if level.upper() == "PRODUCTION" else getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become one plain-text field ("exception") where the error is logged: no locals,
        # the same in console and JSON mode, and nothing left to resolve on the writer thread.
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_plain_traceback)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    target = handler or logging.StreamHandler(stream or sys.stderr)
    target.setFormatter(formatter)
    _stop_listener()  # flushes what the previous configuration still holds
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_semantic", False):
            root.removeHandler(h)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    front = _FormattingQueueHandler(records)
    front._semantic = True  # type: ignore[attr-defined]
    root.addHandler(front)
    root.setLevel(numeric)
    _listener = logging.handlers.QueueListener(records, target, respect_handler_level=False)
    _listener.start()
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Our request logger replaces uvicorn's access log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def flush_logging() -> None:
    """Write out every record logged so far (tests read the stream right after a request)."""
    listener = _listener
    if listener is None:
        return
    import time

    q = listener.queue
    deadline = time.monotonic() + 5
    while not q.empty() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.005)
    for h in listener.handlers:
        h.flush()


class _FormattingQueueHandler(logging.handlers.QueueHandler):
    """Queues the record itself: the standard QueueHandler formats it first and replaces its message,
    which would lose the event dict that structlog's formatter renders on the listener thread."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
