"""FastAPI dependencies: the engine a route serves, ready, and the turn service over it."""

from __future__ import annotations

from fastapi import Request

from semantic_core.engine.engine import Engine
from semantic_core.errors import EngineStopped
from semantic_core.turns import TurnService


def ready_engine(request: Request) -> Engine:
    """The app's engine, or 529 while the model loads (or after it stopped)."""
    engine: Engine = request.app.state.engine
    if not engine.ready:
        raise EngineStopped(
            "the model is still loading; retry shortly" if not engine.started else "the engine is not running"
        )
    return engine


def turns(request: Request) -> TurnService:
    ready_engine(request)
    service: TurnService = request.app.state.turns
    return service


def request_id(request: Request) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid else None
