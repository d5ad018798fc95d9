"""Tool calling for models whose chat template takes tools: what the model can do, the grammar that
holds its calls to the tools' schemas, and reading calls back out of what it wrote.

A model can call tools when mlx-lm recognises a tool-call format in its chat template
(`TokenizerWrapper.has_tool_calling`). The JSON format (`<tool_call>{"name": ..., "arguments": ...}
</tool_call>`, Qwen2.5's and Hermes') is served in full here: calls are constrained by a grammar
(`tool_grammar`, for llguidance) and parsed back (`parse_calls`). Models really emit variations: asked
through its own template with tools, Qwen2.5-Coder-0.5B answers with the bare JSON object and no
tags, so a whole answer that is one such object naming a tool is read as a call too.

The tags may be single added tokens (`<tool_call>` is token 151657 in Qwen2.5): llguidance treats added
tokens as special, so the grammar names them by id (`<[151657]>`), and free text can never contain
them - the text lexeme simply ends where the tag token comes.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from semantic_core.errors import InvalidRequest

ToolChoice = Literal["auto", "any", "tool", "none"]
# JSON as the templates write it (`tojson`): ", " and ": " separators, no newlines. Generating it the
# same way makes a resent conversation render to the very tokens that were generated (cache hits).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def as_template_tool(self) -> dict[str, Any]:
        """The shape chat templates take (`tools=` of `apply_chat_template`, OpenAI's function form)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.schema},
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @staticmethod
    def new_id(prefix: str = "toolu_") -> str:
        return prefix + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolFormat:
    """How one model writes a call: the tags around it, and their token ids when a tag is one token."""

    start: str
    end: str
    start_token: int | None
    end_token: int | None
    json_calls: bool  # the JSON format: served with grammars; otherwise calls are parsed only

    @classmethod
    def of(cls, tokenizer: Any) -> ToolFormat | None:
        if not getattr(tokenizer, "has_tool_calling", False):
            return None
        parser = getattr(tokenizer, "tool_parser", None)
        json_calls = getattr(parser, "__module__", "").endswith(".json_tools")

        def single(tokens: Any) -> int | None:
            return int(tokens[0]) if tokens is not None and len(tokens) == 1 else None

        return cls(
            start=tokenizer.tool_call_start,
            end=tokenizer.tool_call_end,
            start_token=single(tokenizer.tool_call_start_tokens),
            end_token=single(tokenizer.tool_call_end_tokens),
            json_calls=json_calls,
        )

    def _tag(self, text: str, token: int | None) -> str:
        return f"<[{token}]>" if token is not None else json.dumps(text)

    @property
    def open_tag(self) -> str:
        return self._tag(self.start, self.start_token)

    @property
    def close_tag(self) -> str:
        return self._tag(self.end, self.end_token)


# Grammars (llguidance's Lark dialect) -----------------------------------------------------------


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    out.pop("$schema", None)  # a dialect marker; llguidance reads the schema itself
    out["x-guidance"] = JSON_STYLE
    return out


def tool_grammar(
    fmt: ToolFormat, tools: list[ToolSpec], choice: ToolChoice, *, name: str | None = None, parallel: bool = True
) -> str:
    """The grammar of an answer under `choice`: "auto" (text, calls anywhere after it), "any" (one or
    more calls, nothing else), "tool" (calls of `name` only), "none" (text that cannot open a call)."""
    text = "TEXT: /(.|\\n)*/\n"
    if choice == "none":
        return "%llguidance {}\nstart: TEXT\n" + text
    chosen = [t for t in tools if choice != "tool" or t.name == name]
    if not chosen:
        raise InvalidRequest(f"tool_choice: no tool named {name!r} among the tools")
    bodies = []
    for i, tool in enumerate(chosen):
        head = json.dumps(f'{{"name": {json.dumps(tool.name)}, "arguments": ')
        bodies.append(f"call_{i}: {head} %json {json.dumps(_schema(tool.schema))} " + '"}"')
    body = "body: " + " | ".join(f"call_{i}" for i in range(len(chosen))) + "\n" + "\n".join(bodies) + "\n"
    block = f'call_block: {fmt.open_tag} "\\n" body "\\n" {fmt.close_tag}\n'
    if choice == "auto":
        start = "start: TEXT (call_block TEXT)*\n" if parallel else "start: TEXT (call_block TEXT)?\n"
    else:
        # After the last call the model may want a blank line before its end of turn: allow the
        # whitespace (and only that), or it is pushed into starting another call instead.
        calls = 'call_block ("\\n" call_block)*' if parallel else "call_block"
        start = f"start: {calls} TRAILING?\nTRAILING: /[ \\t\\n]{{1,8}}/\n"
    return "%llguidance {}\n" + start + block + body + text


def schema_grammar(schema: dict[str, Any]) -> str:
    """The grammar of an answer that is one JSON value of `schema`."""
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(_schema(schema)))


# Reading calls back -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedAnswer:
    text: str  # the text outside the calls (stripped of the whitespace around them)
    calls: list[ToolCall]


def _call_from_json(obj: Any, names: set[str], id_prefix: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or (names and obj["name"] not in names):
        return None
    return ToolCall(ToolCall.new_id(id_prefix), obj["name"], args)


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_calls(text: str, fmt: ToolFormat | None, tools: list[ToolSpec], *, id_prefix: str = "toolu_") -> ParsedAnswer:
    """The calls in a finished answer, and the text around them. Tagged calls are taken wherever they
    are; an answer that is nothing but one JSON call (bare, or in a ```json fence) is a call too. What
    does not parse as a call of a known tool stays text."""
    names = {t.name for t in tools}
    if fmt is not None and fmt.start in text:
        calls: list[ToolCall] = []
        kept: list[str] = []
        rest = text
        while True:
            i = rest.find(fmt.start)
            if i == -1:
                kept.append(rest)
                break
            j = rest.find(fmt.end, i + len(fmt.start))
            inner = rest[i + len(fmt.start) : j if j != -1 else len(rest)]
            call = None
            try:
                call = _call_from_json(json.loads(inner.strip()), names, id_prefix)
            except ValueError:
                call = None
            if call is None:
                kept.append(rest if j == -1 else rest[: j + len(fmt.end)])
                rest = "" if j == -1 else rest[j + len(fmt.end) :]
                if j == -1:
                    break
                continue
            kept.append(rest[:i])
            calls.append(call)
            if j == -1:
                break
            rest = rest[j + len(fmt.end) :]
        return ParsedAnswer("".join(kept).strip() if calls else text, calls)
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    candidate = (fenced.group(1) if fenced else stripped).strip()
    if candidate.startswith("{") and candidate.endswith("}"):
        bare = _bare_calls(candidate, names, id_prefix)
        if bare:
            return ParsedAnswer("", bare)
    return ParsedAnswer(text, [])


def _bare_calls(text: str, names: set[str], id_prefix: str) -> list[ToolCall]:
    """One or more JSON calls one after another (small models write parallel calls on lines of their
    own), and nothing else; [] when any part is not a call of a known tool."""
    decoder = json.JSONDecoder()
    calls, i = [], 0
    while i < len(text):
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        call = _call_from_json(obj, names, id_prefix)
        if call is None:
            return []
        calls.append(call)
        while i < len(text) and text[i].isspace():
            i += 1
    return calls


def _maybe_bare_call(text: str) -> bool:
    """Whether an answer that begins with `text` may still turn out to be one bare JSON call."""
    if not text or text.startswith("{"):
        return True
    if len(text) < 3:
        return "```".startswith(text)
    if not text.startswith("```"):
        return False
    head, newline, rest = text[3:].partition("\n")
    if not newline:
        return head.strip() in ("", "j", "js", "jso", "json")
    return head.strip() in ("", "json") and (not rest.strip() or rest.lstrip().startswith("{"))


class CallStream:
    """Splits an answer being streamed into text to show now and calls, as soon as each is complete.

    Text is released at once unless it could be the start of a call: a tag being opened, or (when
    the answer so far is nothing but the beginning of a JSON object or a fence) a bare call; that text
    is held until it is known to be one or not.
    """

    def __init__(self, fmt: ToolFormat | None, tools: list[ToolSpec], id_prefix: str = "toolu_") -> None:
        self.fmt = fmt
        self.tools = tools
        self.id_prefix = id_prefix
        self._held = ""
        self._shown_any = False
        self._in_call = False

    def feed(self, text: str) -> list[str | ToolCall]:
        self._held += text
        out: list[str | ToolCall] = []
        while True:
            progressed = self._step(out)
            if not progressed:
                return out

    def _step(self, out: list[str | ToolCall]) -> bool:
        fmt, buf = self.fmt, self._held
        if not buf:
            return False
        if self._in_call:
            assert fmt is not None
            j = buf.find(fmt.end)
            if j == -1:
                return False
            parsed = parse_calls(fmt.start + buf[: j + len(fmt.end)], fmt, self.tools, id_prefix=self.id_prefix)
            out.extend(parsed.calls or [fmt.start + buf[: j + len(fmt.end)]])
            self._held, self._in_call = buf[j + len(fmt.end) :].lstrip("\n"), False
            return True
        if fmt is not None:
            i = buf.find(fmt.start)
            if i != -1:
                if buf[:i].strip():
                    out.append(buf[:i].rstrip("\n"))
                    self._shown_any = True
                self._held, self._in_call = buf[i + len(fmt.start) :], True
                return True
            keep = next((n for n in range(min(len(fmt.start) - 1, len(buf)), 0, -1) if buf.endswith(fmt.start[:n])), 0)
        else:
            keep = 0
        if not self._shown_any and _maybe_bare_call(buf.lstrip()):
            return False  # perhaps a bare call: wait until it is known
        if not buf.strip():
            return False  # whitespace shows with the text after it, or not at all (after the last call)
        release = buf[: len(buf) - keep]
        if release:
            out.append(release)
            self._shown_any = True
            self._held = buf[len(buf) - keep :]
        return False

    def finish(self) -> list[str | ToolCall]:
        """What is still held when the answer ends: a bare call, or text."""
        buf, self._held = self._held, ""
        if not buf.strip():
            return []
        if self._in_call:
            assert self.fmt is not None
            return [self.fmt.start + buf]  # a call cut short (max_tokens): its text
        if not self._shown_any:
            parsed = parse_calls(buf, self.fmt, self.tools, id_prefix=self.id_prefix)
            if parsed.calls:
                return [*([parsed.text] if parsed.text else []), *parsed.calls]
        return [buf]
