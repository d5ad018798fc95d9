"""Health probes, Prometheus metrics and the model list."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from semantic_core import __version__
from semantic_core.api.messages import check_model
from semantic_core.api.schemas import ModelInfoOut, ModelList
from semantic_core.engine.engine import Engine
from semantic_core.errors import EngineStopped

router = APIRouter()


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    """503 once the engine loop has died: the process can no longer serve and must be restarted."""
    engine: Engine = request.app.state.engine
    if engine.crash is not None:
        return JSONResponse(
            {"status": "dead", "reason": "the engine loop stopped after an internal error"}, status_code=503
        )
    return JSONResponse({"status": "ok"})


@router.get("/health/startup")
async def startup(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    if engine.start_error is not None:
        return JSONResponse({"status": "failed", "error": str(engine.start_error)}, status_code=503)
    if not engine.started:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "started"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    if engine.crash is not None:
        return JSONResponse(
            {"status": "not ready", "reason": "the engine loop stopped after an internal error"}, status_code=503
        )
    if not engine.ready:
        return JSONResponse({"status": "not ready", "reason": "the model is not loaded"}, status_code=503)
    snap = engine.snapshot()
    body: dict[str, Any] = {
        "status": "ready",
        "pool_utilization": round(snap.utilization, 4),
        "queue_depth": snap.waiting,
        "running": snap.running,
    }
    if not snap.can_serve:
        body.update(status="not ready", reason="the KV pool is full and nothing can be evicted")
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> dict[str, str]:
    """What answers here (clients such as Claude Code check the server with HEAD /)."""
    return {"name": "semantic", "version": __version__, "api": "/v1/messages, /v1/chat/completions"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _model_out(engine: Engine) -> ModelInfoOut:
    info = engine.info
    if info is None:
        raise EngineStopped("the model is still loading; retry shortly")
    created = datetime.fromtimestamp(info.path.stat().st_mtime, UTC) if info.path.exists() else datetime.now(UTC)
    return ModelInfoOut(
        id=info.model_id,
        display_name=f"{info.model_id} ({info.weights}, {info.device})",
        created_at=created.isoformat().replace("+00:00", "Z"),
        created=int(created.timestamp()),
    )


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    model = _model_out(request.app.state.engine)
    return ModelList(data=[model], has_more=False, first_id=model.id, last_id=model.id).model_dump()


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    engine: Engine = request.app.state.engine
    model = _model_out(engine)
    check_model(engine, model_id)  # aliases (claude-*) name the served model, as in /v1/messages
    return model.model_dump()
