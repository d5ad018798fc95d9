"""Logs and metrics: structlog configuration and every Prometheus metric object of the process.

Metric objects live only here (one source of truth); the engine, store and API import them. They are
registered in a dedicated registry so tests and embedded servers do not collide with the default one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# HTTP ------------------------------------------------------------------------------------------------
REQUESTS = Counter(
    "semantic_request_total", "HTTP requests by route template and status.", ["method", "path", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "semantic_request_duration_seconds", "HTTP request duration by route template.", ["method", "path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    "semantic_requests_in_flight", "HTTP requests being served.", registry=REGISTRY
)
RATE_LIMITED = Counter(
    "semantic_rate_limited_total", "Requests refused by the rate limiter.", ["scope"], registry=REGISTRY
)

# Engine ----------------------------------------------------------------------------------------------
TIME_TO_FIRST_TOKEN = Histogram(
    "semantic_time_to_first_token_seconds", "From submission to the first generated token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
    registry=REGISTRY,
)
TOKENS = Counter(
    "semantic_tokens_total", "Tokens processed, by phase (prefill, decode, reused).", ["phase"],
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Gauge(
    "semantic_tokens_per_second", "Recent throughput (tokens/s) by phase.", ["phase"], registry=REGISTRY
)
BATCH_SIZE = Gauge("semantic_batch_size", "Sequences decoding together now.", registry=REGISTRY)
QUEUE_DEPTH = Gauge("semantic_queue_depth", "Requests waiting to be admitted.", registry=REGISTRY)
GENERATIONS = Counter(
    "semantic_generations_total", "Finished generations by stop reason.", ["stop_reason"], registry=REGISTRY
)

# Agents and the block pool ------------------------------------------------------------------------
POOL_UTILIZATION = Gauge(
    "semantic_pool_utilization_ratio", "Fraction of KV blocks in use (0..1).", registry=REGISTRY
)
POOL_BLOCKS = Gauge("semantic_pool_blocks", "KV blocks by state.", ["state"], registry=REGISTRY)
AGENTS = Gauge("semantic_agents", "Agents by tier.", ["tier"], registry=REGISTRY)
AGENTS_ACTIVE = Gauge("semantic_agents_active", "Agents generating now.", registry=REGISTRY)
CACHE_HITS = Counter(
    "semantic_cache_hit_total", "Requests by cache outcome (hit: some prompt reused; miss: none).",
    ["result"], registry=REGISTRY,
)
EVICTIONS = Counter("semantic_evictions_total", "Agents evicted from memory.", ["reason"], registry=REGISTRY)
SAVES = Counter("semantic_agent_saves_total", "Agent saves by outcome.", ["result"], registry=REGISTRY)
LOADS = Counter("semantic_agent_loads_total", "Agent loads from disk by outcome.", ["result"], registry=REGISTRY)
QUARANTINED = Counter(
    "semantic_quarantined_files_total", "Cache files that failed verification and were moved aside.",
    registry=REGISTRY,
)
DISK_BYTES = Gauge("semantic_cache_disk_bytes", "Bytes of saved agents on disk.", registry=REGISTRY)
SAVE_SECONDS = Histogram(
    "semantic_agent_save_seconds", "Time to write one agent to disk.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
LOAD_SECONDS = Histogram(
    "semantic_agent_load_seconds", "Time to read and verify one agent from disk.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
READY = Gauge("semantic_ready", "1 when the engine can serve (model loaded, pool not stuck full).",
              registry=REGISTRY)

# Labelled series exist from the start (at 0), so rate() and increase() see their first event.
for _phase in ("prefill", "decode", "reused"):
    TOKENS.labels(_phase)
    TOKENS_PER_SECOND.labels(_phase)
for _result in ("hit", "miss"):
    CACHE_HITS.labels(_result)
for _reason in ("pool", "max_agents", "manual", "preempt"):
    EVICTIONS.labels(_reason)
for _result in ("ok", "error"):
    SAVES.labels(_result)
for _result in ("ok", "error", "mismatch"):
    LOADS.labels(_result)
for _scope in ("agent", "global"):
    RATE_LIMITED.labels(_scope)
for _reason in ("end_turn", "max_tokens", "stop_sequence", "cancelled"):
    GENERATIONS.labels(_reason)
for _tier in ("hot", "cold", "damaged"):
    AGENTS.labels(_tier)
for _state in ("used", "free", "shared"):
    POOL_BLOCKS.labels(_state)


def configure_logging(
    level: str = "INFO", stream: TextIO | None = None, *, json: bool | None = None,
    handler: logging.Handler | None = None,
) -> None:
    """Route stdlib logging (uvicorn included) and structlog through one renderer.

    PRODUCTION means JSON lines at INFO; anything else is a console renderer at that level. A UI
    passes its own `handler` so that no log line is ever written over its screen.
    """
    json = (level.upper() == "PRODUCTION") if json is None else json
    numeric = logging.INFO if level.upper() == "PRODUCTION" else getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
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
    handler = handler or logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_semantic", False):
            root.removeHandler(h)
    handler._semantic = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # Our request logger replaces uvicorn's access log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
