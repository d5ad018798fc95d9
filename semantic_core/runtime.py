"""The runtime: one engine, its turn service, and optionally the HTTP API over them, started and
stopped together. `semantic serve` runs it headless; the TUI is handed one and draws it.

- `serve()`: the API alone, owned by uvicorn (graceful shutdown on SIGTERM/SIGINT: stop accepting,
  let streams finish for SEMANTIC_SERVER_DRAIN_SECONDS, save every hot agent, exit 0; exit 70 when
  the engine loop died, for a supervisor to restart it).
- `start_engine()` then `start_api()` inside an event loop that someone else runs (the TUI's): the
  API shares that loop and the engine; `stop()` drains the API and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from semantic_core.api.app import create_app
from semantic_core.api.server import EngineDied, GracefulServer, port_in_use, uvicorn_config
from semantic_core.config import Settings
from semantic_core.engine.engine import Engine
from semantic_core.model.loader import LoadedModel
from semantic_core.observability import configure_logging, get_logger
from semantic_core.turns import TurnService

log = get_logger("semantic.runtime")


class Runtime:
    def __init__(
        self, settings: Settings, *, loaded: LoadedModel | None = None, serve_api: bool = True, group: Any = None
    ) -> None:
        self.settings = settings
        self.engine = Engine(settings, loaded=loaded, group=group)
        self.turns = TurnService(self.engine, settings)
        self.serve_api = serve_api
        self.api_state = "starting" if serve_api else "off (--no-server)"
        self.server: Any = None
        self._server_task: asyncio.Task[None] | None = None

    # Headless ---------------------------------------------------------------------------------------

    def serve(self) -> None:
        """`semantic serve`: the API in the foreground until a signal; the engine starts in the
        background so the probes answer while the model loads."""
        configure_logging(self.settings.server_log_level)
        app = create_app(self.engine, self.settings, owns_engine=True, turns=self.turns)
        server = GracefulServer(uvicorn_config(app, self.settings))
        engine = self.engine

        def watchdog() -> None:
            engine.dead.wait()
            log.critical("the engine loop died: stopping the server so that it can be restarted")
            server.should_exit = True

        threading.Thread(target=watchdog, name="semantic-watchdog", daemon=True).start()
        server.run()
        self.turns.close()
        if engine.crash is not None:
            raise EngineDied()

    def follow(self) -> None:
        """A follower rank of a distributed engine (`semantic serve --distributed`, rank > 0): the
        engine in lockstep with rank 0, no API, until rank 0 stops it. Signals are rank 0's to act
        on (a launcher may send them to every rank): a follower that left early would stall the group."""
        import signal

        configure_logging(self.settings.server_log_level)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        self.engine.start()
        self.engine.wait_stopped()
        if self.engine.crash is not None:
            raise EngineDied()

    # Embedded ---------------------------------------------------------------------------------------

    def start_engine(self) -> None:
        """Load the model and start the engine (blocking: call it from a worker thread)."""
        self.engine.start()

    @property
    def requests_per_second_source(self) -> Engine | None:
        """The engine whose metrics count this runtime's API requests, when it serves one."""
        return self.engine if self.server is not None else None

    async def start_api(self) -> str:
        """Serve the API in the running event loop; returns the state line for a UI."""
        if not self.serve_api:
            return self.api_state
        host, port = self.settings.server_host, self.settings.server_port
        if port_in_use(host, port):
            self.api_state = f"off: port {port} busy"
            return self.api_state
        app = create_app(self.engine, self.settings, owns_engine=False, turns=self.turns)
        self.server = _EmbeddedServer(uvicorn_config(app, self.settings))
        self._server_task = asyncio.create_task(self._serve())
        self.api_state = f"http://{host}:{port}"
        return self.api_state

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        except (SystemExit, OSError) as exc:
            self.api_state = "off: failed to start"
            log.error("the embedded API stopped", error=str(exc))

    async def stop(self) -> None:
        """Drain the API (streams may finish for SEMANTIC_SERVER_DRAIN_SECONDS), then stop the engine,
        which saves every hot agent."""
        if self.server is not None:
            self.server.should_exit = True
            if self._server_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server_task, timeout=self.settings.server_drain_seconds + 5)
        await asyncio.to_thread(self.engine.stop)
        self.turns.close()


class _EmbeddedServer(GracefulServer):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the UI owns the terminal and its signals
