"""The Anthropic Messages API wire format: text, tool use and structured output.

Unknown fields are tolerated (clients send newer parameters than we know); content blocks the model
cannot use (images, documents, Anthropic's server tools) are refused by `to_chat` with a message
naming the block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from semantic_core.errors import InvalidRequest

# Numbers as JSON numbers: "5" or true for max_tokens is a client bug to report, not to coerce.
StrictNumber = Annotated[float, Field(strict=True)]


def find_invalid_text(value: Any, path: str = "") -> str | None:
    """The path of the first string in a parsed JSON value that is not valid Unicode text (a lone
    surrogate such as "\\ud800", which JSON escapes can carry but UTF-8 cannot encode), with why."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            return (
                f"{path or 'body'}: the text is not valid Unicode: a lone surrogate "
                f"(U+{ord(bad):04X}) at character {exc.start}"
            )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = find_invalid_text(key, f"{path}.{key}" if path else "key")
            found = found or find_invalid_text(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_invalid_text(item, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


_CONTROL = {chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))}


def no_control_characters(value: str | None, what: str) -> str | None:
    if value is not None and any(ch in _CONTROL for ch in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


class _Lenient(BaseModel):
    """Unknown fields are tolerated (clients send newer parameters than we know)."""

    model_config = ConfigDict(extra="allow")


class _Request(_Lenient):
    """A request body: every string anywhere in it (unknown fields included) must be valid Unicode,
    checked once over the whole body before any field is used."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        found = find_invalid_text(data)
        if found:
            raise InvalidText(found)
        return data


class InvalidText(ValueError):
    """Raised during validation; the error handler reports its message alone (it names the field)."""


class ContentBlock(_Lenient):
    type: str
    text: str | None = None
    # tool_use
    id: str | None = None
    name: str | None = None
    input: Any = None
    # tool_result
    tool_use_id: str | None = None
    content: str | list[ContentBlock] | None = None
    is_error: bool | None = None


class Message(_Lenient):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Metadata(_Lenient):
    user_id: str | None = None


class Tool(_Lenient):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; Anthropic's own tools ("bash_...") are not served


class ToolChoiceIn(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    format: OutputFormat | None = None


class MessagesRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message]
    max_tokens: StrictInt = Field(ge=1)
    system: str | list[ContentBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: StrictNumber | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictNumber | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceIn | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the structured-outputs beta's name for the same
    thinking: dict[str, Any] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) > 16:
                raise ValueError("at most 16 stop sequences")
            if any(not s for s in value):
                raise ValueError("stop sequences must not be empty")
        return value


class CountTokensRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message]
    system: str | list[ContentBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceIn | None = None


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class ModelInfoOut(BaseModel):
    """Anthropic's fields, and OpenAI's (object, created, owned_by), so either SDK lists it."""

    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "semantic"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfoOut]
    has_more: bool = False
    first_id: str | None
    last_id: str | None


class _Named(_Request):
    @field_validator("display_name", check_fields=False)
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        return no_control_characters(value, "display_name")


class AgentCreate(_Named):
    id: str | None = Field(default=None, max_length=64)
    display_name: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = None  # bounded by SEMANTIC_AGENT_MAX_SYSTEM_PROMPT_CHARS (checked by the route)


class AgentPatch(_Named):
    display_name: str | None = Field(default=None, max_length=200)


class AgentFork(_Named):
    id: str | None = Field(default=None, max_length=64)
    display_name: str | None = Field(default=None, max_length=200)


_UNUSABLE = {
    "image": "image blocks: this model reads text only",
    "document": "document blocks: this model reads text only",
    "server_tool_use": "server tool blocks: this server does not run Anthropic's server tools",
    "web_search_tool_result": "web search results: this server does not run Anthropic's server tools",
}
_IGNORABLE = {"thinking", "redacted_thinking"}
# Claude Code puts a per-request line (its version and a hash of the first prompt) first in the
# system prompt; it changes nothing for the model and would make every session's prompt differ.
_VOLATILE_SYSTEM_PREFIX = "x-anthropic-billing-header:"


def _text_of(content: str | list[ContentBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type == "text":
            if block.text is None:
                raise InvalidRequest(f"{where}.content.{i}.text: a text block needs a text field")
            if not block.text:
                raise InvalidRequest(f"{where}.content.{i}.text: text content blocks must be non-empty")
            parts.append(block.text)
        elif block.type in _IGNORABLE:
            continue
        elif block.type in _UNUSABLE:
            raise InvalidRequest(f"{where}.content.{i}: {_UNUSABLE[block.type]}")
        elif block.type in ("tool_use", "tool_result"):
            raise InvalidRequest(f"{where}.content.{i}: a {block.type} block cannot appear here")
        else:
            raise InvalidRequest(f"{where}.content.{i}.type: unsupported content block type {block.type!r}")
    return "\n".join(parts)


def _result_text(block: ContentBlock, where: str) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = _text_of(content, where)
    return f"Error: {text}" if block.is_error else text


def _system_text(system: str | list[ContentBlock]) -> str:
    if isinstance(system, str):
        return system
    kept = [b for b in system if not (b.type == "text" and (b.text or "").startswith(_VOLATILE_SYSTEM_PREFIX))]
    return _text_of(kept, "system") if kept else ""


def to_chat(
    messages: list[Message], system: str | list[ContentBlock] | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Flatten to the chat template's messages, and the system prompt.

    Text blocks join into `content`; an assistant's `tool_use` blocks become its `tool_calls`; a user
    message's `tool_result` blocks become "tool" messages (before the user's own text), each of which
    must answer a `tool_use` of the assistant message just before. `role: "system"` entries inside
    `messages` (as newer clients send them) join the system prompt.
    """
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    system_parts: list[str] = []
    if system is not None:
        text = _system_text(system)
        if text:
            system_parts.append(text)
    chat: list[dict[str, Any]] = []
    open_calls: set[str] = set()  # ids of the previous assistant message's tool_use blocks
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        blocks = [] if isinstance(m.content, str) else m.content
        texts: list[ContentBlock] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, block in enumerate(blocks):
            if block.type == "tool_use" and m.role == "assistant":
                if not block.id or not block.name or not isinstance(block.input, dict):
                    raise InvalidRequest(
                        f"{where}.content.{j}: a tool_use block needs an id, a name and an input object"
                    )
                calls.append(
                    {"type": "function", "id": block.id, "function": {"name": block.name, "arguments": block.input}}
                )
            elif block.type == "tool_result" and m.role == "user":
                if block.tool_use_id not in open_calls:
                    raise InvalidRequest(
                        f"{where}.content.{j}: unexpected tool_use_id {block.tool_use_id!r} in a tool_result block: "
                        "each tool_result must answer a tool_use block of the previous assistant message"
                    )
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": block.tool_use_id,
                        "content": _result_text(block, f"{where}.content.{j}"),
                    }
                )
            else:
                texts.append(block)
        text = m.content if isinstance(m.content, str) else _text_of(texts, where)
        if m.role == "system":
            if text:
                system_parts.append(text)
            continue
        open_calls = {c["id"] for c in calls}
        chat.extend(results)
        if results and not text:
            continue
        if not text and not calls and not (m.role == "assistant" and i == len(messages) - 1):
            raise InvalidRequest(
                f"{where}: all messages must have non-empty content except for the optional final assistant message"
            )
        entry: dict[str, Any] = {"role": m.role, "content": text}
        if calls:
            entry["tool_calls"] = calls
        chat.append(entry)
    if not chat:
        raise InvalidRequest("messages: at least one user or assistant message is required")
    if chat[0]["role"] != "user":
        raise InvalidRequest("messages.0.role: the first message must be from the user")
    return chat, ("\n\n".join(system_parts) if system_parts else None)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid_request_error: validation, malformed JSON, bad content"},
    401: {"model": ErrorResponse, "description": "authentication_error: missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "not_found_error: unknown model, agent or endpoint"},
    409: {"model": ErrorResponse, "description": "invalid_request_error: the agent belongs to another model"},
    413: {"model": ErrorResponse, "description": "request_too_large"},
    429: {"model": ErrorResponse, "description": "rate_limit_error (see the retry-after header)"},
    500: {"model": ErrorResponse, "description": "api_error"},
    529: {"model": ErrorResponse, "description": "overloaded_error: queue full, model loading, KV pool full"},
}


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
