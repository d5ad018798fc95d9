"""POST /v1/messages (JSON or SSE) and POST /v1/messages/count_tokens."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from semantic_core.api.deps import ready_engine, request_id, turns
from semantic_core.api.errors import status_and_kind
from semantic_core.api.schemas import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    TextBlock,
    Usage,
    to_chat,
)
from semantic_core.engine.engine import Engine
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.types import (
    Failed,
    Finished,
    GenerationResult,
    PrefillProgress,
    Started,
    TextDelta,
)
from semantic_core.errors import EngineStopped, ModelNotFound, SemanticError
from semantic_core.observability import get_logger
from semantic_core.turns import Turn, TurnService

router = APIRouter()
log = get_logger("semantic.api")

_PING_EVERY = 1.0  # seconds between pings while a long prompt is prefilled


def check_model(engine: Engine, name: str) -> None:
    info = engine.info
    if info is None:
        raise EngineStopped("the model is still loading; retry shortly")
    if name in (info.model_id, "default"):
        return
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in engine.settings.server_model_aliases):
        return
    raise ModelNotFound(f"model {name!r} is not served here; this server serves {info.model_id!r}")


def _usage(prompt: int, cached: int, output: int) -> dict[str, int]:
    # Every computed prompt token is cached for the next turn; `input_tokens` counts what was
    # computed, `cache_read_input_tokens` what was reused: together, the whole prompt.
    return Usage(
        input_tokens=prompt - cached,
        output_tokens=output,
        cache_read_input_tokens=cached,
        cache_creation_input_tokens=0,
    ).model_dump()


@router.post("/v1/messages")
async def create_message(
    body: MessagesRequest,
    request: Request,
    x_agent_id: str | None = Header(default=None),
    engine: Engine = Depends(ready_engine),
    service: TurnService = Depends(turns),
) -> Any:
    check_model(engine, body.model)
    chat, system = to_chat(body.messages, body.system)
    turn = Turn(
        messages=chat,
        system=system,
        agent_id=x_agent_id or None,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop_sequences=list(body.stop_sequences or []),
        request_id=request_id(request),
    )
    started = await service.start(turn)
    handle = started.handle
    events = handle.__aiter__()
    try:
        first = await events.__anext__()
    except BaseException:
        handle.cancel()
        raise
    if isinstance(first, Failed):
        raise first.error
    assert isinstance(first, Started)
    message_id = f"msg_{secrets.token_hex(12)}"
    headers = {"x-agent-id": first.agent_id}
    model = engine.info.model_id  # type: ignore[union-attr]
    if not body.stream:
        return await _complete(request, handle, events, message_id, model, headers)
    return EventSourceResponse(
        _stream(handle, events, first, message_id, model),
        headers=headers,
        ping=15,
        ping_message_factory=lambda: ServerSentEvent(event="ping", data='{"type": "ping"}'),
        shutdown_grace_period=engine.settings.server_drain_seconds,
        sep="\n",
    )


async def _complete(
    request: Request,
    handle: RequestHandle,
    events: AsyncIterator[Any],
    message_id: str,
    model: str,
    headers: dict[str, str],
) -> JSONResponse:
    result: GenerationResult | None = None

    async def consume() -> None:
        nonlocal result
        async for event in events:
            if isinstance(event, Finished):
                result = event.result
            elif isinstance(event, Failed):
                raise event.error

    consumer = asyncio.create_task(consume())
    try:
        while not consumer.done():
            done, _ = await asyncio.wait({consumer}, timeout=0.5)
            if not done and await request.is_disconnected():
                handle.cancel()  # nobody will read the answer: free the batch slot
        consumer.result()
    finally:
        if not consumer.done():
            consumer.cancel()
        if not handle.done.is_set():
            handle.cancel()
    assert result is not None
    if not result.turn_saved:
        headers = {**headers, "x-semantic-turn-saved": "false"}
    usage = result.usage
    response = MessageResponse(
        id=message_id,
        model=model,
        content=[TextBlock(text=result.text)],
        stop_reason=_stop_reason(result),
        stop_sequence=result.stop_sequence,
        usage=Usage(**_usage(usage.prompt_tokens, usage.cached_tokens, usage.output_tokens)),
    )
    return JSONResponse(response.model_dump(), headers=headers)


def _stop_reason(result: GenerationResult) -> str:
    return "end_turn" if result.stop_reason == "cancelled" else result.stop_reason


def _event(name: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": name, "data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


async def _stream(
    handle: RequestHandle, events: AsyncIterator[Any], started: Started, message_id: str, model: str
) -> AsyncIterator[dict[str, str]]:
    try:
        yield _event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": _usage(started.prompt_tokens, started.cached_tokens, 0),
                },
            },
        )
        yield _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
        yield _event("ping", {"type": "ping"})
        last_ping = time.monotonic()
        async for event in events:
            if isinstance(event, TextDelta):
                yield _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": event.text}},
                )
            elif isinstance(event, PrefillProgress):
                if time.monotonic() - last_ping >= _PING_EVERY:
                    last_ping = time.monotonic()
                    yield _event("ping", {"type": "ping"})
            elif isinstance(event, Finished):
                r = event.result
                yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
                delta: dict[str, Any] = {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(r), "stop_sequence": r.stop_sequence},
                    "usage": _usage(r.usage.prompt_tokens, r.usage.cached_tokens, r.usage.output_tokens),
                }
                if not r.turn_saved:  # the answer is complete, but a restart would lose it
                    delta["semantic"] = {"turn_saved": False, "error": r.save_error}
                yield _event("message_delta", delta)
                yield _event("message_stop", {"type": "message_stop"})
                return
            elif isinstance(event, Failed):
                err = event.error
                if isinstance(err, SemanticError):
                    kind, message = status_and_kind(err)[1], err.message
                else:
                    kind, message = "api_error", "generation failed"
                    log.error("generation failed mid-stream", error=repr(err))
                yield _event("error", {"type": "error", "error": {"type": kind, "message": message}})
                return
    finally:
        if not handle.done.is_set():
            handle.cancel()  # the client went away (or the server is stopping): stop generating


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest,
    engine: Engine = Depends(ready_engine),
    service: TurnService = Depends(turns),
) -> dict[str, int]:
    check_model(engine, body.model)
    chat, system = to_chat(body.messages, body.system)
    return {"input_tokens": await service.count_tokens(chat, system)}
