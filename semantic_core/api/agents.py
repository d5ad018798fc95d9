"""/v1/agents: list, create, get (with history), rename, save, evict, load, pin/unpin, fork, delete.

Agent operations run on the engine thread between two generation steps; handlers wait for them in a
worker thread so the event loop keeps serving streams.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from semantic_core.agents.record import validate_agent_id
from semantic_core.api.deps import ready_engine
from semantic_core.api.schemas import AgentCreate, AgentFork, AgentPatch
from semantic_core.engine.engine import Engine
from semantic_core.engine.snapshot import AgentInfo
from semantic_core.errors import InvalidRequest
from semantic_core.turns import TurnService

router = APIRouter(prefix="/v1/agents", tags=["agents"])


def _engine(request: Request) -> Engine:
    return ready_engine(request)


def check_system_prompt(engine: Engine, system: str | None) -> None:
    """Agents store their system prompt: it is bounded (SEMANTIC_AGENT_MAX_SYSTEM_PROMPT_CHARS)."""
    limit = engine.settings.agent_max_system_prompt_chars
    if system is not None and len(system) > limit:
        raise InvalidRequest(
            f"system_prompt: {len(system)} characters, over the limit of {limit} "
            "(SEMANTIC_AGENT_MAX_SYSTEM_PROMPT_CHARS)"
        )


def agent_json(info: AgentInfo, *, preview: bool = False) -> dict[str, Any]:
    system = info.system_prompt
    truncated = preview and system is not None and len(system) > _PREVIEW_CHARS
    return {
        "type": "agent",
        "id": info.id,
        "display_name": info.name,
        "tier": info.tier,
        "pinned": info.pinned,
        "generating": info.running,
        "tokens": info.tokens,
        "kv_bytes": info.kv_bytes,
        "disk_bytes": info.disk_bytes,
        "blocks": info.blocks,
        "shared_blocks": info.shared_blocks,
        "saved": info.on_disk and not info.dirty,
        "compatible": info.compatible,
        "damaged": info.damaged,
        "messages": info.messages,
        "system_prompt": system[:_PREVIEW_CHARS] + "…" if truncated and system else system,
        "system_prompt_truncated": truncated,
        "forked_from": info.forked_from,
        "created_at": info.created_at,
        "last_used": info.last_used,
        "cache_reused_tokens": info.reused_tokens,
        "cache_computed_tokens": info.computed_tokens,
    }


_PREVIEW_CHARS = 200


@router.get("")
async def list_agents(
    request: Request,
    limit: int = Query(100, ge=1, le=1000, description="Agents per page (1-1000)."),
    after_id: str | None = Query(None, max_length=64, description="Page after this agent id."),
    before_id: str | None = Query(None, max_length=64, description="Page before this agent id."),
) -> dict[str, Any]:
    """Agents in id order, a page at a time (Anthropic's list shape: `has_more`, `first_id`,
    `last_id`; the next page is `?after_id=<last_id>`). System prompts are cut to a preview here;
    GET /v1/agents/{id} has the whole of it."""
    engine = _engine(request)
    if after_id is not None and before_id is not None:
        raise InvalidRequest("give after_id or before_id, not both")
    snap = await asyncio.to_thread(engine.snapshot, True)  # sorted by id, and current
    agents = list(snap.agents)
    if after_id is not None:
        agents = [a for a in agents if a.id > after_id]
        page, has_more = agents[:limit], len(agents) > limit
    elif before_id is not None:
        agents = [a for a in agents if a.id < before_id]
        page, has_more = agents[-limit:], len(agents) > limit
    else:
        page, has_more = agents[:limit], len(agents) > limit
    data = [agent_json(a, preview=True) for a in page]
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.post("", status_code=201)
async def create_agent(body: AgentCreate, request: Request) -> JSONResponse:
    engine = _engine(request)
    if body.id is not None:
        validate_agent_id(body.id)
    check_system_prompt(engine, body.system_prompt)
    info = await asyncio.to_thread(
        engine.create_agent, body.id, display_name=body.display_name, system_prompt=body.system_prompt
    )
    return JSONResponse(agent_json(info), status_code=201, headers={"x-agent-id": info.id})


@router.get("/{agent_id}")
async def get_agent(agent_id: str, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    info, messages = await asyncio.to_thread(engine.get_agent, validate_agent_id(agent_id))
    return {**agent_json(info), "history": messages}


async def _own(request: Request, agent_id: str) -> None:
    """In a cluster: take the agent over from the instance that holds it (see semantic_core.cluster)."""
    service: TurnService = request.app.state.turns
    await service.own(validate_agent_id(agent_id))


@router.patch("/{agent_id}")
async def rename_agent(agent_id: str, body: AgentPatch, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    await _own(request, agent_id)
    info = await asyncio.to_thread(engine.rename_agent, validate_agent_id(agent_id), body.display_name)
    return agent_json(info)


@router.delete("/{agent_id}")
async def delete_agent(agent_id: str, request: Request) -> dict[str, Any]:
    engine = _engine(request)
    await _own(request, agent_id)
    await asyncio.to_thread(engine.delete_agent, validate_agent_id(agent_id))
    return {"type": "agent_deleted", "id": agent_id, "deleted": True}


async def _action(request: Request, agent_id: str, fn_name: str, *args: Any) -> dict[str, Any]:
    engine = _engine(request)
    await _own(request, agent_id)
    fn = getattr(engine, fn_name)
    info = await asyncio.to_thread(fn, validate_agent_id(agent_id), *args)
    return agent_json(info)


@router.post("/{agent_id}/save")
async def save_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return await _action(request, agent_id, "save_agent")


@router.post("/{agent_id}/evict")
async def evict_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return await _action(request, agent_id, "evict_agent")


@router.post("/{agent_id}/load")
async def load_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return await _action(request, agent_id, "load_agent")


@router.post("/{agent_id}/rehome")
async def rehome_agent(agent_id: str, request: Request) -> dict[str, Any]:
    """Move an agent saved with another model to the loaded one (its next turn recomputes its conversation)."""
    return await _action(request, agent_id, "rehome_agent")


@router.post("/{agent_id}/pin")
async def pin_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return await _action(request, agent_id, "pin_agent", True)


@router.post("/{agent_id}/unpin")
async def unpin_agent(agent_id: str, request: Request) -> dict[str, Any]:
    return await _action(request, agent_id, "pin_agent", False)


@router.post("/{agent_id}/fork", status_code=201)
async def fork_agent(agent_id: str, request: Request, body: AgentFork | None = None) -> JSONResponse:
    engine = _engine(request)
    body = body or AgentFork()
    if body.id is not None:
        validate_agent_id(body.id)
    await _own(request, agent_id)
    info = await asyncio.to_thread(
        engine.fork_agent, validate_agent_id(agent_id), body.id, display_name=body.display_name
    )
    return JSONResponse(agent_json(info), status_code=201, headers={"x-agent-id": info.id})


@router.post("/{agent_id}/release")
async def release_agent(agent_id: str, request: Request) -> dict[str, Any]:
    """In a cluster: another instance asks this one to hand the agent over. Its files are written,
    its cache leaves memory and its lock is released; 400 while it is generating (ask again)."""
    engine = _engine(request)
    await asyncio.to_thread(engine.release_agent, validate_agent_id(agent_id))
    return {"type": "agent_released", "id": agent_id, "instance": engine.settings.cluster_instance}
