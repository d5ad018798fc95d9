"""The Anthropic Messages API wire format (the subset a text-only local model serves).

Unknown fields are tolerated (clients send newer parameters than we know); content blocks the model
cannot use are refused by `to_chat` with a message naming the block.
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


class Message(_Lenient):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Metadata(_Lenient):
    user_id: str | None = None


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


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class ModelInfoOut(BaseModel):
    type: Literal["model"] = "model"
    id: str
    display_name: str
    created_at: str


class ModelList(BaseModel):
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
    "tool_use": "tool_use blocks: this server does not run tools",
    "tool_result": "tool_result blocks: this server does not run tools",
    "server_tool_use": "server tool blocks: this server does not run tools",
    "web_search_tool_result": "web search results: this server does not run tools",
}
_IGNORABLE = {"thinking", "redacted_thinking"}


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
        else:
            raise InvalidRequest(f"{where}.content.{i}.type: unsupported content block type {block.type!r}")
    return "\n".join(parts)


def to_chat(
    messages: list[Message], system: str | list[ContentBlock] | None
) -> tuple[list[dict[str, str]], str | None]:
    """Flatten to [{"role", "content"}] for the chat template, and the system prompt.

    `role: "system"` entries inside `messages` (as newer clients send them) join the system prompt.
    """
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    system_parts: list[str] = []
    if system is not None:
        text = _text_of(system, "system") if not isinstance(system, str) else system
        if text:
            system_parts.append(text)
    chat: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        text = _text_of(m.content, f"messages.{i}")
        if m.role == "system":
            if text:
                system_parts.append(text)
            continue
        if not text and not (m.role == "assistant" and i == len(messages) - 1):
            raise InvalidRequest(
                f"messages.{i}: all messages must have non-empty content except for the optional final "
                "assistant message"
            )
        chat.append({"role": m.role, "content": text})
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
    413: {"model": ErrorResponse, "description": "request_too_large"},
    429: {"model": ErrorResponse, "description": "rate_limit_error (see the retry-after header)"},
    500: {"model": ErrorResponse, "description": "api_error"},
    529: {"model": ErrorResponse, "description": "overloaded_error: queue full, model loading, KV pool full"},
}


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
