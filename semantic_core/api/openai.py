"""POST /v1/chat/completions: OpenAI's chat-completions shape over the same turn service, engine and
agents as /v1/messages (X-Agent-ID names the agent; without it the prefix index finds one).

Errors on this route are in OpenAI's envelope (`OpenAIErrorMiddleware`); streams end with
`data: [DONE]`, with a usage chunk first when `stream_options.include_usage` is set.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StrictInt
from sse_starlette import EventSourceResponse

from semantic_core.api.deps import ready_engine, request_id, turns
from semantic_core.api.messages import begin_turn, cap_max_tokens, check_model, collect, stream_error
from semantic_core.api.schemas import _Lenient, _Request
from semantic_core.engine.engine import Engine
from semantic_core.engine.types import Failed, Finished, GenerationResult, TextDelta
from semantic_core.errors import InvalidRequest
from semantic_core.model.tools import CallStream, ParsedAnswer, ToolCall, ToolChoice, ToolSpec, parse_calls
from semantic_core.observability import get_logger
from semantic_core.turns import ToolPlan, Turn, TurnService

router = APIRouter()
log = get_logger("semantic.api")

StrictNumber = Annotated[float, Field(strict=True)]


class Part(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class Function(_Lenient):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolIn(_Lenient):
    type: Literal["function"] = "function"
    function: Function


class NamedFunction(_Lenient):
    name: str


class NamedChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(_Lenient):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictNumber | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictNumber | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    n: StrictInt = Field(default=1, ge=1, le=1)


def _text(content: str | list[Part] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"{where}.content.{i}: only text parts are served (this model reads text only)")
        parts.append(part.text)
    return "\n".join(parts)


def to_chat(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], str | None]:
    """OpenAI messages -> the chat template's messages and the system prompt."""
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    system: list[str] = []
    chat: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        text = _text(m.content, where)
        if m.role in ("system", "developer"):
            if text:
                system.append(text)
            continue
        if m.role == "tool":
            if m.tool_call_id not in open_calls:
                raise InvalidRequest(
                    f"{where}.tool_call_id: {m.tool_call_id!r} answers no tool call of the assistant message before"
                )
            chat.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": text})
            continue
        entry: dict[str, Any] = {"role": m.role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except ValueError:
                    raise InvalidRequest(f"{where}.tool_calls.{j}.function.arguments: not valid JSON") from None
                if not isinstance(arguments, dict):
                    raise InvalidRequest(f"{where}.tool_calls.{j}.function.arguments: must be a JSON object")
                calls.append(
                    {
                        "type": "function",
                        "id": call.id,
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            entry["tool_calls"] = calls
            open_calls = {call.id for call in m.tool_calls}
        elif not text and not (m.role == "assistant" and i == len(messages) - 1):
            raise InvalidRequest(f"{where}.content: must not be empty")
        chat.append(entry)
    if not chat:
        raise InvalidRequest("messages: at least one user or assistant message is required")
    if chat[0]["role"] != "user":
        raise InvalidRequest("messages: the first message (after system messages) must be from the user")
    return chat, ("\n\n".join(system) if system else None)


def _schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    return fmt.json_schema.schema_ if fmt.json_schema else {"type": "object"}


def _choice(body: ChatRequest) -> tuple[ToolChoice, str | None]:
    choice = body.tool_choice
    if choice is None:
        return "auto", None
    if isinstance(choice, NamedChoice):
        return "tool", choice.function.name
    named: dict[str, ToolChoice] = {"auto": "auto", "none": "none", "required": "any"}
    return named[choice], None


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatRequest,
    request: Request,
    x_agent_id: str | None = Header(default=None),
    engine: Engine = Depends(ready_engine),
    service: TurnService = Depends(turns),
) -> Any:
    check_model(engine, body.model)
    chat, system = to_chat(body.messages)
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens, headers = cap_max_tokens(engine, asked) if asked else (None, {})
    choice, name = _choice(body)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    tools = [
        ToolSpec(t.function.name, t.function.description or "", t.function.parameters or {"type": "object"})
        for t in body.tools or []
    ]
    turn = Turn(
        messages=chat,
        system=system,
        agent_id=x_agent_id or None,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop_sequences=stops,
        request_id=request_id(request),
        tools=tools,
        tool_choice=choice,
        tool_name=name,
        parallel_tool_calls=body.parallel_tool_calls,
        response_schema=_schema(body.response_format),
        strict_context=True,
    )
    started, events, _ = await begin_turn(service, turn, headers)
    handle = started.handle
    completion = f"chatcmpl-{secrets.token_hex(12)}"
    model = engine.info.model_id  # type: ignore[union-attr]
    plan = started.tools
    if not body.stream:
        result = await collect(request, handle, events)
        if not result.turn_saved:
            headers["x-semantic-turn-saved"] = "false"
        parsed = parse_calls(result.text, plan.format, plan.tools, id_prefix="call_") if plan.active else None
        parsed = parsed or ParsedAnswer(result.text, [])
        message: dict[str, Any] = {
            "role": "assistant",
            "content": parsed.text if parsed.text or not parsed.calls else None,
        }
        if parsed.calls:
            message["tool_calls"] = [_call_out(c) for c in parsed.calls]
        payload = {
            "id": completion,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "finish_reason": _finish(result, bool(parsed.calls)), "logprobs": None}
            ],
            "usage": _usage(result),
        }
        return JSONResponse(payload, headers=headers)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventSourceResponse(
        _stream(handle, events, completion, model, plan, include_usage),
        headers=headers,
        ping=15,
        shutdown_grace_period=engine.settings.server_drain_seconds,
        sep="\n",
    )


def _call_out(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }
    if index is not None:
        out = {"index": index, **out}
    return out


def _finish(result: GenerationResult, called: bool) -> str:
    if called and result.stop_reason in ("end_turn", "stop_sequence"):
        return "tool_calls"
    return "length" if result.stop_reason == "max_tokens" else "stop"


def _usage(result: GenerationResult) -> dict[str, Any]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.prompt_tokens + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


async def _stream(
    handle: Any, events: AsyncIterator[Any], completion: str, model: str, plan: ToolPlan, include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    created = int(time.time())
    calls = CallStream(plan.format, plan.tools, id_prefix="call_") if plan.active else None
    n_calls = 0

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, str]:
        body: dict[str, Any] = {
            "id": completion,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": []
            if usage is not None
            else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if usage is not None:
            body["usage"] = usage
        elif include_usage:
            body["usage"] = None
        return {"data": json.dumps(body, ensure_ascii=False, separators=(",", ":"))}

    def items(found: list[str | ToolCall]) -> list[dict[str, str]]:
        nonlocal n_calls
        out = []
        for item in found:
            if isinstance(item, str):
                out.append(chunk({"content": item}))
            else:
                out.append(chunk({"tool_calls": [_call_out(item, n_calls)]}))
                n_calls += 1
        return out

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in events:
            if isinstance(event, TextDelta):
                for out in items(calls.feed(event.text)) if calls else [chunk({"content": event.text})]:
                    yield out
            elif isinstance(event, Finished):
                r = event.result
                if calls is not None:
                    for out in items(calls.finish()):
                        yield out
                yield chunk({}, _finish(r, n_calls > 0))
                if include_usage:
                    yield chunk({}, usage=_usage(r))
                yield {"data": "[DONE]"}
                return
            elif isinstance(event, Failed):
                kind, message = stream_error(event.error)
                yield {"data": json.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}})}
                return
    finally:
        if not handle.done.is_set():
            handle.cancel()
