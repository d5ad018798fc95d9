"""Rendering a conversation into prompt tokens with the model's chat template.

A conversation that ends with an assistant message is a prefill: the answer continues that text, so
the template's end-of-turn after it must not be rendered. Templates differ in what they append after
an assistant message, so the cut is found with a sentinel rather than by knowing the template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from semantic_core.errors import InvalidRequest

_SENTINEL = "\u2063semantic-prefill-cut\u2063"


@dataclass(frozen=True)
class RenderedPrompt:
    tokens: list[int]
    text: str
    continues_text: str  # the assistant prefill the answer continues ("" when none)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> RenderedPrompt:
    """`messages`: [{"role": "user"|"assistant"|"system", "content": str}, ...]."""
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    convo: list[dict[str, str]] = []
    if system:
        convo.append({"role": "system", "content": system})
    convo.extend({"role": m["role"], "content": m["content"]} for m in messages)
    prefill = convo[-1]["role"] == "assistant"
    continues = convo[-1]["content"] if prefill else ""
    try:
        if prefill:
            staged = [*convo[:-1], {"role": "assistant", "content": _SENTINEL}]
            text = _apply(tokenizer, staged, add_generation_prompt=False)
            cut = text.find(_SENTINEL)
            if cut == -1:
                raise InvalidRequest("this model's chat template cannot continue an assistant message")
            text = text[:cut] + continues
        else:
            text = _apply(tokenizer, convo, add_generation_prompt=True)
    except InvalidRequest:
        raise
    except Exception as exc:  # jinja errors from templates that reject a role order, etc.
        raise InvalidRequest(f"messages: the model's chat template rejected them: {exc}") from exc
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return RenderedPrompt(tokens=list(tokens), text=text, continues_text=continues)


def _apply(tokenizer: Any, convo: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "has_chat_template", True) and getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(convo, add_generation_prompt=add_generation_prompt, tokenize=False))
    # No template: a plain transcript the model can still continue.
    lines = [f"{m['role']}: {m['content']}" for m in convo]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
