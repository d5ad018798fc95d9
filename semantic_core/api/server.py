"""Running the API with uvicorn: its configuration, the graceful server, and the app factory for
`semantic serve --reload` (the runtime, `semantic_core/runtime.py`, runs it).

Graceful shutdown on SIGTERM/SIGINT (uvicorn's own handling): stop accepting, let in-flight requests
and streams finish for up to SEMANTIC_SERVER_DRAIN_SECONDS, then the app's lifespan stops the
engine, which saves every hot agent. A second start lists them all again (cold, on disk).
"""

from __future__ import annotations

import socket

import uvicorn

from semantic_core.api.app import create_app
from semantic_core.config import Settings, load_settings
from semantic_core.engine.engine import Engine
from semantic_core.observability import configure_logging, get_logger

log = get_logger("semantic.server")


def uvicorn_config(app: object, settings: Settings, **overrides: object) -> uvicorn.Config:
    options: dict[str, object] = {
        "host": settings.server_host,
        "port": settings.server_port,
        "log_config": None,  # structlog owns the handlers (configure_logging)
        "access_log": False,  # AccessLogMiddleware writes one structured line per request
        "timeout_graceful_shutdown": max(1, int(settings.server_drain_seconds)),
        "lifespan": "on",
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


def port_in_use(host: str, port: int) -> bool:
    if port == 0:
        return False
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would end with
    status 143/130. A drained, saved shutdown is a success: exit 0."""

    def handle_exit(self, sig: int, frame: object) -> None:
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        self._captured_signals.clear()


class EngineDied(SystemExit):
    """`semantic serve` ends with this (exit status 70) when the engine loop died, so that a
    supervisor restarts the process instead of leaving a server that answers nothing."""

    def __init__(self) -> None:
        super().__init__(70)


def reload_factory() -> object:
    """App factory for `semantic serve --reload` (uvicorn re-imports it in its worker)."""
    settings = load_settings()
    configure_logging(settings.server_log_level)
    return create_app(Engine(settings), settings, owns_engine=True)
