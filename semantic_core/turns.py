"""One turn service for every front end: the HTTP APIs, the TUI and the CLI start turns here.

`TurnService.start(turn)` renders the conversation with the model's chat template (on the engine's
tokenizer threads, after a cheap length check), applies the one defaults policy, and submits the
request; the caller reads events from the handle it gets back.

The defaults policy, field by field (temperature, top_p, top_k, min_p, repetition_penalty,
max_tokens), first that gives a value wins:

1. the request (what the API client, the TUI's form, or the CLI's flags say);
2. the agent's stored sampling (set when it was created, e.g. in the TUI's "new agent" form);
3. the model's own generation defaults (its `generation_config.json`), unless
   SEMANTIC_MLX_MODEL_SAMPLING=false;
4. the settings: SEMANTIC_MLX_DEFAULT_TEMPERATURE, SEMANTIC_MLX_DEFAULT_TOP_P, ...,
   SEMANTIC_MLX_DEFAULT_MAX_TOKENS.

The settings' defaults were chosen by measurement (benchmarks/sampling_defaults.py: short factual
and instruction prompts, scored for the right answer and against degenerate repetition).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from semantic_core.agents.record import validate_agent_id
from semantic_core.cluster import Handoff
from semantic_core.config import Settings
from semantic_core.engine.constraints import Constraint
from semantic_core.engine.engine import Engine
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.snapshot import AgentInfo
from semantic_core.engine.types import GenerationRequest
from semantic_core.errors import ContextOverflow, EngineStopped, InvalidRequest, PromptTooLong
from semantic_core.model.chat import RenderedPrompt, render_chat
from semantic_core.model.tools import ToolChoice, ToolFormat, ToolSpec, schema_grammar, tool_grammar
from semantic_core.observability import get_logger

log = get_logger("semantic.turns")

# Prompts longer than this (characters) are tokenized on a thread of their own.
LARGE_PROMPT_CHARS = 32_000

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Turn:
    """What a front end asks for. `None` means "no preference": the defaults policy decides."""

    messages: list[dict[str, Any]]
    system: str | None = None
    agent_id: str | None = None
    create_agent: bool = True
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_sequences: list[str] = field(default_factory=list)
    request_id: str | None = None
    use_stored_system_prompt: bool = True  # a named agent's own system prompt when the turn gives none
    # Tool use: the tools offered, and what the answer may do with them ("auto": text or calls,
    # "any": calls only, "tool": calls of `tool_name` only, "none": text only).
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    # Structured output: the answer is one JSON value of this schema.
    response_schema: dict[str, Any] | None = None
    # The HTTP APIs refuse a prompt + max_tokens over the context (Anthropic does, and clients shrink
    # and retry on its message); the TUI and CLI let the answer run until the context is full.
    strict_context: bool = False


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float | None
    max_tokens: int
    sources: dict[str, str]  # field -> "request", "agent", "model" or "settings"


@dataclass(frozen=True)
class Started:
    handle: RequestHandle
    prompt: RenderedPrompt
    sampling: Sampling
    tools: ToolPlan


@dataclass(frozen=True)
class ToolPlan:
    """How a turn's answer is read: the tools its calls may name (none: plain text), the model's call
    format, and a note for the client when the tools were set aside (a model that cannot call tools)."""

    tools: list[ToolSpec] = field(default_factory=list)
    format: ToolFormat | None = None
    ignored: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.tools)


class TurnService:
    def __init__(self, engine: Engine, settings: Settings | None = None) -> None:
        self.engine = engine
        self.settings = settings or engine.settings
        self._small = ThreadPoolExecutor(max_workers=2, thread_name_prefix="semantic-render")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-render-large")
        self._noted: set[str] = set()
        # In a cluster: takes a named agent over from the instance that holds it, before submission.
        self.handoff = (
            Handoff(engine.ownership, self.settings, engine.metrics) if engine.ownership is not None else None
        )

    async def own(self, agent_id: str) -> None:
        """In a cluster: this instance owns the agent (a live owner hands it over) and its view here
        is read from its files. Raises AgentElsewhere when the owner does not let go in time."""
        if self.handoff is None:
            return
        validate_agent_id(agent_id)
        await self.handoff.acquire(agent_id)
        await self.engine.acall(lambda: self.engine.adopt(agent_id))

    def note_once(self, key: str, message: str) -> None:
        """One log line the first time something happens, not one per request."""
        if key not in self._noted:
            self._noted.add(key)
            log.info(message)

    def close(self) -> None:
        self._small.shutdown(wait=False)
        self._large.shutdown(wait=False)

    # The defaults policy ---------------------------------------------------------------------------

    def settings_defaults(self) -> dict[str, Any]:
        s = self.settings
        return {
            "temperature": s.mlx_default_temperature,
            "top_p": s.mlx_default_top_p,
            "top_k": s.mlx_default_top_k,
            "min_p": s.mlx_default_min_p,
            "repetition_penalty": s.mlx_default_repetition_penalty,
            "max_tokens": s.mlx_default_max_tokens,
        }

    def model_defaults(self) -> dict[str, Any]:
        info = self.engine.info
        if info is None or not self.settings.mlx_model_sampling:
            return {}
        return dict(info.generation_defaults)

    def sampling(self, turn: Turn, agent: AgentInfo | None) -> Sampling:
        stored = (
            {}
            if agent is None
            else {
                "temperature": agent.temperature,
                "top_p": agent.top_p,
                "top_k": agent.top_k,
                "max_tokens": agent.max_tokens,
            }
        )
        layers = (
            ("request", {f: getattr(turn, f) for f in (*SAMPLING_FIELDS, "max_tokens")}),
            ("agent", stored),
            ("model", self.model_defaults()),
            ("settings", self.settings_defaults()),
        )
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in (*SAMPLING_FIELDS, "max_tokens"):
            for source, layer in layers:
                if layer.get(name) is not None:
                    values[name], sources[name] = layer[name], source
                    break
        penalty = values.get("repetition_penalty")
        return Sampling(
            temperature=float(values["temperature"]),
            top_p=float(values["top_p"]),
            top_k=int(values["top_k"]),
            min_p=float(values["min_p"]),
            repetition_penalty=float(penalty) if penalty not in (None, 1.0) else None,
            max_tokens=int(values["max_tokens"]),
            sources=sources,
        )

    # Rendering ---------------------------------------------------------------------------------------

    def check_prompt_chars(self, chars: int) -> None:
        """Refuse a prompt by its length alone, before the (costly) tokenization: each token holds at
        most `max_token_chars` characters, so more characters than that times the context cannot fit."""
        info = self._info()
        bound = info.context_length * info.max_token_chars
        if chars > bound:
            raise PromptTooLong(-(-chars // info.max_token_chars), info.context_length, estimated=True)

    async def render(
        self, messages: list[dict[str, Any]], system: str | None = None, tools: list[ToolSpec] | None = None
    ) -> RenderedPrompt:
        """The chat template over the conversation, off the event loop: large prompts take turns on
        one thread, so a burst of them never delays the small ones (or the default thread pool)."""
        chars = _chars(messages, system, tools)
        self.check_prompt_chars(chars)
        pool = self._large if chars > LARGE_PROMPT_CHARS else self._small
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, lambda: self._render(messages, system, tools))

    def render_sync(
        self, messages: list[dict[str, Any]], system: str | None = None, tools: list[ToolSpec] | None = None
    ) -> RenderedPrompt:
        self.check_prompt_chars(_chars(messages, system, tools))
        return self._render(messages, system, tools)

    def _render(
        self, messages: list[dict[str, Any]], system: str | None, tools: list[ToolSpec] | None
    ) -> RenderedPrompt:
        template_tools = [t.as_template_tool() for t in tools] if tools else None
        return render_chat(self.engine.tokenizer, messages, system, bos=self._info().bos, tools=template_tools)

    # Tools and grammars ----------------------------------------------------------------------------------

    def tool_plan(self, turn: Turn) -> ToolPlan:
        """Check what the turn asks of tools against what the model can do (before any work)."""
        fmt = self.engine.tool_format
        model = self._info().model_id
        forced = turn.tool_choice in ("any", "tool")
        if turn.tools and fmt is None:
            if forced:
                raise InvalidRequest(
                    f"tool_choice {turn.tool_choice!r}: {model} cannot call tools (its chat template has no tool "
                    "format); serve a model that can, such as qwen2.5-coder-0.5b-instruct"
                )
            return ToolPlan(ignored=f"{model} cannot call tools: the tools were left out and the turn served as chat")
        if forced and not turn.tools:
            raise InvalidRequest(f"tool_choice: {turn.tool_choice!r} needs tools, and the request has none")
        if forced and fmt is not None and not fmt.json_calls:
            raise InvalidRequest(f"tool_choice: {turn.tool_choice!r} cannot be enforced for {model}'s call format")
        if turn.tool_choice == "tool" and turn.tool_name not in {t.name for t in turn.tools}:
            raise InvalidRequest(f"tool_choice.name: no tool named {turn.tool_name!r} among the tools")
        names = [t.name for t in turn.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("tools: tool names must be unique")
        return ToolPlan(tools=list(turn.tools) if turn.tool_choice != "none" else [], format=fmt)

    def _constraint(self, turn: Turn, plan: ToolPlan) -> Constraint | None:
        """The grammar the answer follows, compiled (call it off the event loop)."""
        grammars = self.engine.grammars
        if grammars is None:
            return None
        fmt = plan.format
        if fmt is not None and fmt.json_calls and turn.tools and turn.response_schema is None:
            if turn.tool_choice == "auto" and not plan.active:
                return None
            grammar = tool_grammar(
                fmt, turn.tools, turn.tool_choice, name=turn.tool_name, parallel=turn.parallel_tool_calls
            )
            return grammars.compile(grammar, f"tool_choice {turn.tool_choice}")
        if turn.response_schema is not None:
            if turn.tool_choice in ("any", "tool"):
                raise InvalidRequest("a structured output format and a forced tool_choice cannot both hold")
            try:
                grammar = schema_grammar(turn.response_schema)
            except Exception as exc:  # llguidance refuses schemas it cannot express
                raise InvalidRequest(f"output format: the JSON schema cannot be enforced: {exc}") from exc
            return grammars.compile(grammar, "the output format's JSON schema")
        return None

    # Starting a turn -----------------------------------------------------------------------------------

    async def start(self, turn: Turn) -> Started:
        if turn.agent_id is not None:
            await self.own(turn.agent_id)
        agent, system = self._prepare(turn)
        plan = self.tool_plan(turn)
        rendered = self.render(turn.messages, system, plan.tools or self._offered(turn, plan))
        prompt = await rendered
        loop = asyncio.get_running_loop()
        constraint = await loop.run_in_executor(self._small, lambda: self._constraint(turn, plan))
        sampling = self.sampling(turn, agent)
        self._check_room(turn, prompt, sampling)
        handle = self.engine.submit_async(self._request(turn, prompt, system, sampling, constraint))
        return Started(handle, prompt, sampling, plan)

    def start_sync(self, turn: Turn) -> Started:
        """For threads without an event loop (the CLI): events are read with a plain `for`."""
        agent, system = self._prepare(turn)
        plan = self.tool_plan(turn)
        prompt = self.render_sync(turn.messages, system, plan.tools or self._offered(turn, plan))
        constraint = self._constraint(turn, plan)
        sampling = self.sampling(turn, agent)
        self._check_room(turn, prompt, sampling)
        handle = self.engine.submit(self._request(turn, prompt, system, sampling, constraint))
        return Started(handle, prompt, sampling, plan)

    def _check_room(self, turn: Turn, prompt: RenderedPrompt, sampling: Sampling) -> None:
        limit = self._info().context_length
        n = len(prompt.tokens)
        if n >= limit:
            raise PromptTooLong(n, limit)
        if turn.strict_context and n + sampling.max_tokens > limit:
            raise ContextOverflow(n, sampling.max_tokens, limit)

    def divergence(self, turn: Turn, prompt: RenderedPrompt, token: int, held: int) -> str:
        """Where a prompt left the agent's cache, for a header and the log: the message (its index in
        the request's messages; "system" for the system prompt and tool definitions), the KV block
        and the token offset, and how many tokens the cache held."""
        at = len(self.engine.tokenizer.decode(prompt.tokens[:token]))
        where: int | str = "system"
        cursor = 0  # where the text of the message before ends
        for i, message in enumerate(turn.messages):
            # The text of a message: its content, then each call's name and arguments.
            pieces = [str(message.get("content") or "")]
            for call in message.get("tool_calls") or ():
                fn = call.get("function", call)
                pieces += [str(fn.get("name") or ""), json.dumps(fn.get("arguments") or {}, ensure_ascii=False)]
            found, end = -1, cursor
            for piece in (p for p in pieces if p):
                at_piece = prompt.text.find(piece, end)
                if at_piece != -1:
                    found = at_piece if found == -1 else found
                    end = at_piece + len(piece)
            if found != -1 and at < found:
                # Between two messages' texts: past this one's role header (its first tokens, as
                # the model wrote them), or before it (the end of the one before, or what the
                # model wrote after its answer).
                gap = prompt.text[cursor:found]
                roles = {str(message.get("role"))} | ({"user"} if message.get("role") == "tool" else set())
                header = max((gap.rfind(role) for role in roles), default=-1)
                where = i if header != -1 and at >= cursor + header else ("system" if i == 0 else i - 1)
                break
            where = i
            if at < end:
                break
            cursor = end
        block = token // self.settings.mlx_block_tokens
        return f"message={where}; block={block}; token={token}; cached={held}"

    @staticmethod
    def _offered(turn: Turn, plan: ToolPlan) -> list[ToolSpec] | None:
        """The tools the prompt shows: all of them for a tool model (with "none" too, as the
        template describes them either way), none for a model that cannot call them."""
        return list(turn.tools) if turn.tools and plan.ignored is None else None

    async def count_tokens(
        self, messages: list[dict[str, Any]], system: str | None, tools: list[ToolSpec] | None = None
    ) -> int:
        offered = tools if tools and self.engine.tool_format is not None else None
        return len((await self.render(messages, system, offered)).tokens)

    def _prepare(self, turn: Turn) -> tuple[AgentInfo | None, str | None]:
        """The named agent's view (its sampling, its stored system prompt) and the system prompt."""
        if not turn.messages:
            raise InvalidRequest("messages: at least one message is required")
        if turn.agent_id is not None:
            validate_agent_id(turn.agent_id)
        agent = self._agent(turn.agent_id) if turn.agent_id else None
        system = turn.system
        if system is None and agent is not None and turn.use_stored_system_prompt:
            system = agent.system_prompt
        limit = self.settings.agent_max_system_prompt_chars
        if system is not None and len(system) > limit:
            raise InvalidRequest(
                f"system: {len(system)} characters, over the limit of {limit} (SEMANTIC_AGENT_MAX_SYSTEM_PROMPT_CHARS)"
            )
        return agent, system

    def _agent(self, agent_id: str) -> AgentInfo | None:
        # In a cluster the agent may have just been read from its files: the snapshot must be current.
        snapshot = self.engine.snapshot(fresh=self.handoff is not None)
        return next((a for a in snapshot.agents if a.id == agent_id), None)

    def _request(
        self,
        turn: Turn,
        prompt: RenderedPrompt,
        system: str | None,
        sampling: Sampling,
        constraint: Constraint | None = None,
    ) -> GenerationRequest:
        return GenerationRequest(
            tokens=prompt.tokens,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            stop_sequences=list(turn.stop_sequences),
            agent_id=turn.agent_id,
            create_agent=turn.create_agent,
            messages=turn.messages,
            system_prompt=system,
            continues_text=prompt.continues_text,
            request_id=turn.request_id,
            constraint=constraint,
        )

    def _info(self) -> Any:
        info = self.engine.info
        if info is None:
            raise EngineStopped("the model is still loading; retry shortly")
        return info


def _chars(messages: list[dict[str, Any]], system: str | None, tools: list[ToolSpec] | None) -> int:
    chars = sum(len(str(m.get("content") or "")) for m in messages) + len(system or "")
    if tools:
        chars += sum(len(t.name) + len(t.description) + len(str(t.schema)) for t in tools)
    return chars
