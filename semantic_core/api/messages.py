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
    Tool,
    ToolUseBlock,
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
from semantic_core.errors import EngineStopped, InvalidRequest, ModelNotFound, SemanticError
from semantic_core.model.tools import CallStream, ParsedAnswer, ToolCall, ToolSpec, parse_calls
from semantic_core.observability import get_logger
from semantic_core.turns import Started as TurnStarted
from semantic_core.turns import ToolPlan, Turn, TurnService

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
    max_tokens, headers = cap_max_tokens(engine, body.max_tokens)
    tools = tool_specs(body.tools)
    choice = body.tool_choice
    output = (body.output_config.format if body.output_config else None) or body.output_format
    if body.thinking and body.thinking.get("type") not in (None, "disabled"):
        service.note_once("thinking", "a request asked for thinking; this model does not think, so it answers without")
    turn = Turn(
        messages=chat,
        system=system,
        agent_id=x_agent_id or None,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop_sequences=list(body.stop_sequences or []),
        request_id=request_id(request),
        tools=tools,
        tool_choice=choice.type if choice else "auto",
        tool_name=choice.name if choice else None,
        parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
        response_schema=output.schema_ if output else None,
        strict_context=True,
    )
    started, events, first = await begin_turn(service, turn, headers)
    handle = started.handle
    message_id = f"msg_{secrets.token_hex(12)}"
    model = engine.info.model_id  # type: ignore[union-attr]
    if not body.stream:
        return await _complete(request, handle, events, message_id, model, headers, started.tools)
    return EventSourceResponse(
        _stream(handle, events, first, message_id, model, started.tools),
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
    plan: ToolPlan,
) -> JSONResponse:
    result = await collect(request, handle, events)
    if not result.turn_saved:
        headers = {**headers, "x-semantic-turn-saved": "false"}
    usage = result.usage
    parsed = parse_calls(result.text, plan.format, plan.tools) if plan.active else ParsedAnswer(result.text, [])
    content: list[TextBlock | ToolUseBlock] = [TextBlock(text=parsed.text)] if parsed.text or not parsed.calls else []
    content.extend(ToolUseBlock(id=c.id, name=c.name, input=c.arguments) for c in parsed.calls)
    response = MessageResponse(
        id=message_id,
        model=model,
        content=content,
        stop_reason=_stop_reason(result, bool(parsed.calls)),
        stop_sequence=result.stop_sequence,
        usage=Usage(**_usage(usage.prompt_tokens, usage.cached_tokens, usage.output_tokens)),
    )
    return JSONResponse(response.model_dump(), headers=headers)


async def collect(request: Request, handle: RequestHandle, events: AsyncIterator[Any]) -> GenerationResult:
    """The finished answer; cancelled when the client goes away before it is done."""
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
    return result


async def begin_turn(
    service: TurnService, turn: Turn, headers: dict[str, str]
) -> tuple[TurnStarted, AsyncIterator[Any], Started]:
    """Start the turn (both APIs) and wait for the engine's Started event, before any response is
    sent, so errors up to admission are plain HTTP errors. `headers` gains the agent that answers,
    where the prompt left its cache when it did (why it missed), and any warning."""
    started = await service.start(turn)
    if started.tools.ignored:
        headers["x-semantic-warning"] = started.tools.ignored
        service.note_once("tools-ignored", started.tools.ignored)
    events = started.handle.__aiter__()
    try:
        first = await events.__anext__()
    except BaseException:
        started.handle.cancel()
        raise
    if isinstance(first, Failed):
        raise first.error
    assert isinstance(first, Started)
    headers["x-agent-id"] = first.agent_id
    if first.diverged_from is not None:
        headers["x-semantic-cache-miss"] = service.divergence(
            turn, started.prompt, first.cached_tokens, first.diverged_from
        )
    return started, events, first


def stream_error(err: Exception) -> tuple[str, str]:
    """An error after a stream started, as (error type, message) for the stream's error event."""
    if isinstance(err, SemanticError):
        return status_and_kind(err)[1], err.message
    log.error("generation failed mid-stream", error=repr(err))
    return "api_error", "generation failed"


def cap_max_tokens(engine: Engine, asked: int) -> tuple[int, dict[str, str]]:
    """max_tokens lowered to SEMANTIC_SERVER_MAX_OUTPUT_TOKENS, with a header saying so when it is."""
    cap = engine.settings.server_max_output_tokens
    if asked <= cap:
        return asked, {}
    return cap, {"x-semantic-max-tokens": f"{cap}; asked {asked}, capped by SEMANTIC_SERVER_MAX_OUTPUT_TOKENS"}


def tool_specs(tools: list[Tool] | None) -> list[ToolSpec]:
    specs = []
    for i, tool in enumerate(tools or []):
        if tool.type not in (None, "custom"):
            raise InvalidRequest(
                f"tools.{i}: {tool.type!r} is one of Anthropic's own tools, which this server does not run"
            )
        if tool.input_schema is None:
            raise InvalidRequest(f"tools.{i}.input_schema: a tool needs an input_schema")
        specs.append(ToolSpec(tool.name, tool.description or "", tool.input_schema))
    return specs


def _stop_reason(result: GenerationResult, called: bool = False) -> str:
    if called and result.stop_reason in ("end_turn", "stop_sequence"):
        return "tool_use"
    return "end_turn" if result.stop_reason == "cancelled" else result.stop_reason


def _event(name: str, data: dict[str, Any]) -> dict[str, str]:
    return {"event": name, "data": json.dumps(data, ensure_ascii=False, separators=(",", ":"))}


async def _stream(
    handle: RequestHandle,
    events: AsyncIterator[Any],
    started: Started,
    message_id: str,
    model: str,
    plan: ToolPlan,
) -> AsyncIterator[dict[str, str]]:
    blocks = _Blocks(plan)
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
        if not plan.active:
            for out in blocks.text(""):  # plain chat: the text block opens at once
                yield out
        yield _event("ping", {"type": "ping"})
        last_ping = time.monotonic()
        async for event in events:
            if isinstance(event, TextDelta):
                for out in blocks.feed(event.text):
                    yield out
            elif isinstance(event, PrefillProgress):
                if time.monotonic() - last_ping >= _PING_EVERY:
                    last_ping = time.monotonic()
                    yield _event("ping", {"type": "ping"})
            elif isinstance(event, Finished):
                r = event.result
                for out in blocks.finish():
                    yield out
                delta: dict[str, Any] = {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(r, blocks.called), "stop_sequence": r.stop_sequence},
                    "usage": _usage(r.usage.prompt_tokens, r.usage.cached_tokens, r.usage.output_tokens),
                }
                if not r.turn_saved:  # the answer is complete, but a restart would lose it
                    delta["semantic"] = {"turn_saved": False, "error": r.save_error}
                yield _event("message_delta", delta)
                yield _event("message_stop", {"type": "message_stop"})
                return
            elif isinstance(event, Failed):
                kind, message = stream_error(event.error)
                yield _event("error", {"type": "error", "error": {"type": kind, "message": message}})
                return
    finally:
        if not handle.done.is_set():
            handle.cancel()  # the client went away (or the server is stopping): stop generating


class _Blocks:
    """The content blocks of a streamed answer: text deltas into an open text block, and each tool
    call, once complete, as a tool_use block (its input in one input_json_delta)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.calls = CallStream(plan.format, plan.tools) if plan.active else None
        self.index = -1
        self.open_text = False
        self.called = False

    def text(self, text: str) -> list[dict[str, str]]:
        out = []
        if not self.open_text:
            self.index += 1
            self.open_text = True
            out.append(
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}},
                )
            )
        if text:
            out.append(
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}},
                )
            )
        return out

    def _close(self) -> list[dict[str, str]]:
        if not self.open_text:
            return []
        self.open_text = False
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _call(self, call: ToolCall) -> list[dict[str, str]]:
        self.called = True
        out = self._close()
        self.index += 1
        start = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        out.append(
            _event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": start})
        )
        partial = json.dumps(call.arguments, ensure_ascii=False)
        out.append(
            _event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self.index,
                    "delta": {"type": "input_json_delta", "partial_json": partial},
                },
            )
        )
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return out

    def _items(self, items: list[str | ToolCall]) -> list[dict[str, str]]:
        out = []
        for item in items:
            out.extend(self.text(item) if isinstance(item, str) else self._call(item))
        return out

    def feed(self, text: str) -> list[dict[str, str]]:
        if self.calls is None:
            return self.text(text)
        return self._items(self.calls.feed(text))

    def finish(self) -> list[dict[str, str]]:
        out = self._items(self.calls.finish()) if self.calls is not None else []
        if self.index == -1:
            out.extend(self.text(""))  # an empty answer still has its (empty) text block
        return out + self._close()


@router.post("/v1/messages/count_tokens")
async def count_tokens(
    body: CountTokensRequest,
    engine: Engine = Depends(ready_engine),
    service: TurnService = Depends(turns),
) -> dict[str, int]:
    check_model(engine, body.model)
    chat, system = to_chat(body.messages, body.system)
    return {"input_tokens": await service.count_tokens(chat, system, tool_specs(body.tools))}
