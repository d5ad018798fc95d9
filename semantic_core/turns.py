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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from semantic_core.agents.record import validate_agent_id
from semantic_core.config import Settings
from semantic_core.engine.engine import Engine
from semantic_core.engine.handle import RequestHandle
from semantic_core.engine.snapshot import AgentInfo
from semantic_core.engine.types import GenerationRequest
from semantic_core.errors import EngineStopped, InvalidRequest, PromptTooLong
from semantic_core.model.chat import RenderedPrompt, render_chat

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


class TurnService:
    def __init__(self, engine: Engine, settings: Settings | None = None) -> None:
        self.engine = engine
        self.settings = settings or engine.settings
        self._small = ThreadPoolExecutor(max_workers=2, thread_name_prefix="semantic-render")
        self._large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semantic-render-large")

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

    async def render(self, messages: list[dict[str, Any]], system: str | None = None) -> RenderedPrompt:
        """The chat template over the conversation, off the event loop: large prompts take turns on
        one thread, so a burst of them never delays the small ones (or the default thread pool)."""
        chars = sum(len(str(m.get("content") or "")) for m in messages) + len(system or "")
        self.check_prompt_chars(chars)
        pool = self._large if chars > LARGE_PROMPT_CHARS else self._small
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, render_chat, self.engine.tokenizer, messages, system)

    def render_sync(self, messages: list[dict[str, Any]], system: str | None = None) -> RenderedPrompt:
        chars = sum(len(str(m.get("content") or "")) for m in messages) + len(system or "")
        self.check_prompt_chars(chars)
        return render_chat(self.engine.tokenizer, messages, system)

    # Starting a turn -----------------------------------------------------------------------------------

    async def start(self, turn: Turn) -> Started:
        agent, system = self._prepare(turn)
        prompt = await self.render(turn.messages, system)
        sampling = self.sampling(turn, agent)
        handle = self.engine.submit_async(self._request(turn, prompt, system, sampling))
        return Started(handle, prompt, sampling)

    def start_sync(self, turn: Turn) -> Started:
        """For threads without an event loop (the CLI): events are read with a plain `for`."""
        agent, system = self._prepare(turn)
        prompt = self.render_sync(turn.messages, system)
        sampling = self.sampling(turn, agent)
        handle = self.engine.submit(self._request(turn, prompt, system, sampling))
        return Started(handle, prompt, sampling)

    async def count_tokens(self, messages: list[dict[str, Any]], system: str | None) -> int:
        return len((await self.render(messages, system)).tokens)

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
        return next((a for a in self.engine.snapshot().agents if a.id == agent_id), None)

    def _request(self, turn: Turn, prompt: RenderedPrompt, system: str | None, sampling: Sampling) -> GenerationRequest:
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
        )

    def _info(self) -> Any:
        info = self.engine.info
        if info is None:
            raise EngineStopped("the model is still loading; retry shortly")
        return info
