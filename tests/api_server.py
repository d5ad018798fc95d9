"""A real uvicorn server on a free local port, in a background thread, for API tests."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from semantic_core.api.app import create_app
from semantic_core.api.server import uvicorn_config
from semantic_core.config import Settings
from semantic_core.engine.engine import Engine


class ServerThread:
    def __init__(self, settings: Settings, loaded: Any) -> None:
        self.settings = settings
        self.engine = Engine(settings, loaded=loaded)
        self.app = create_app(self.engine, settings, owns_engine=True)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, port=0, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.engine.ready):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
