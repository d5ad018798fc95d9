"""Rendering a conversation into prompt tokens with the model's chat template.

A conversation that ends with an assistant message is a prefill: the answer continues that text, so
the template's end-of-turn after it must not be rendered. Templates differ in what they append after
an assistant message, so the cut is found with a sentinel rather than by knowing the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from semantic_core.errors import InvalidRequest

_SENTINEL = "\u2063semantic-prefill-cut\u2063"


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    text: str
    continues_text: str  # the assistant prefill the answer continues ("" when none)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    system: str | None = None,
    *,
    bos: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> RenderedPrompt:
    """`messages`: [{"role": "user"|"assistant"|"system"|"tool", "content": str}, ...], where an
    assistant message may carry `tool_calls` ([{"type": "function", "function": {"name", "arguments"
    (a dict)}}]) and a "tool" message is a tool's result. `tools`: the template's tool definitions
    (OpenAI's function form). `bos`: the text of the model's beginning-of-sequence token, for a model
    without a chat template that expects one (a template writes its own)."""
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    convo: list[dict[str, Any]] = []
    if system:
        convo.append({"role": "system", "content": system})
    convo.extend(dict(m) for m in messages)
    last = convo[-1]
    prefill = last["role"] == "assistant" and not last.get("tool_calls")
    continues = str(last["content"]) if prefill else ""
    try:
        if prefill:
            staged = [*convo[:-1], {"role": "assistant", "content": _SENTINEL}]
            text = _apply(tokenizer, staged, add_generation_prompt=False, tools=tools)
            cut = text.find(_SENTINEL)
            if cut == -1:
                raise InvalidRequest("this model's chat template cannot continue an assistant message")
            text = text[:cut] + continues
        else:
            text = _apply(tokenizer, convo, add_generation_prompt=True, tools=tools)
    except InvalidRequest:
        raise
    except Exception as exc:  # jinja errors from templates that reject a role order, etc.
        raise InvalidRequest(f"messages: the model's chat template rejected them: {exc}") from exc
    if bos and not _has_template(tokenizer) and not text.startswith(bos):
        text = bos + text
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return RenderedPrompt(tokens=list(tokens), text=text, continues_text=continues)


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", True) and getattr(tokenizer, "chat_template", None))


def _apply(
    tokenizer: Any, convo: list[dict[str, Any]], *, add_generation_prompt: bool, tools: list[dict[str, Any]] | None
) -> str:
    if _has_template(tokenizer):
        extra = {"tools": tools} if tools else {}
        return str(
            tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=False, **extra)
        )
    # No template: a plain transcript the model can still continue.
    lines = [f"{m['role']}: {_plain(m)}" for m in convo]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)


def _plain(message: dict[str, Any]) -> str:
    """A message as transcript text (no template): its content, then any tool calls as JSON."""
    parts = [str(message.get("content") or "")]
    for call in message.get("tool_calls") or ():
        fn = call.get("function", call)
        parts.append(json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}, ensure_ascii=False))
    return "\n".join(p for p in parts if p)
