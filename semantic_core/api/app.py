"""The FastAPI application factory: the API on top of one engine.

`create_app(engine, settings)` serves an engine someone else runs (the TUI embeds it this way);
with `owns_engine=True` the app starts the engine in the background at start-up (probes answer
while the model loads) and stops it, saving every hot agent, at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from semantic_core import __version__
from semantic_core.api import agents, errors, messages, openai, probes
from semantic_core.api.middleware import (
    AccessLogMiddleware,
    AuthMiddleware,
    BodySizeLimitMiddleware,
    CrossSiteGuardMiddleware,
    HostCheckMiddleware,
    MetricsMiddleware,
    OpenAIErrorMiddleware,
    RateLimitMiddleware,
    RequestIDMiddleware,
    UnhandledErrorMiddleware,
)
from semantic_core.api.schemas import ERROR_RESPONSES
from semantic_core.config import Settings
from semantic_core.engine.engine import Engine
from semantic_core.observability import get_logger
from semantic_core.turns import TurnService

log = get_logger("semantic.api")


def create_app(
    engine: Engine, settings: Settings, *, owns_engine: bool = False, turns: TurnService | None = None
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = None
        if owns_engine and not engine.started:
            starting = asyncio.create_task(asyncio.to_thread(engine.start))
            starting.add_done_callback(_report_start)
        try:
            yield
        finally:
            if owns_engine:
                if starting is not None and not starting.done():
                    with contextlib.suppress(Exception):
                        await starting
                await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="semantic",
        version=__version__,
        summary="Anthropic-compatible Messages API over many local agents with persistent KV caches.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.turns = turns or TurnService(engine, settings)
    errors.install(app)
    app.include_router(messages.router, tags=["messages"], responses=ERROR_RESPONSES)
    app.include_router(openai.router, tags=["openai"])
    app.include_router(agents.router, responses=ERROR_RESPONSES)
    app.include_router(probes.router, tags=["probes"])

    # Added innermost first: the request passes RequestID first and the body limit last.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=int(settings.server_max_body_mb * 1024 * 1024))
    app.add_middleware(
        RateLimitMiddleware,
        per_client=settings.server_rate_limit_per_client,
        global_=settings.server_rate_limit_global,
        metrics=engine.metrics,
    )
    app.add_middleware(AuthMiddleware, keys=settings.api_keys)
    app.add_middleware(
        CrossSiteGuardMiddleware, allowed_hosts=settings.allowed_hosts, cors_origins=settings.server_cors_origins
    )
    if settings.server_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server_cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["request-id", "x-agent-id", "x-response-time", "retry-after", "x-semantic-instance"],
        )
    app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=engine.metrics)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(OpenAIErrorMiddleware)
    app.add_middleware(RequestIDMiddleware, instance=settings.cluster_instance)
    return app


def _report_start(task: asyncio.Task[Any]) -> None:
    exc = task.exception() if not task.cancelled() else None
    if exc is not None:
        log.error("the engine failed to start", error=str(exc))
