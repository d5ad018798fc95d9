"""What callers hand the engine and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "cancelled"]


@dataclass
class GenerationRequest:
    """One turn for one agent.

    `tokens` is the whole prompt as the chat template renders it. `agent_id` names the agent (created
    if new when `create_agent` is set); without it the agent whose cache is the longest prefix of
    `tokens` serves the request, or a new one. `messages` (the conversation as text) is stored in the
    agent's record with the answer appended, so a UI can show it after a restart.
    """

    tokens: list[int]
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None  # mlx-lm's logits processor; None or 1.0: off
    repetition_context_size: int = 64
    stop_sequences: list[str] = field(default_factory=list)
    agent_id: str | None = None
    create_agent: bool = True
    messages: list[dict[str, Any]] | None = None
    system_prompt: str | None = None
    request_id: str | None = None
    # When the prompt ends inside an assistant turn (a prefill), the answer continues that text.
    continues_text: str = ""
    # A compiled grammar (`constraints.Constraint`) the answer must follow: a tool call, a JSON schema.
    constraint: Any = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # reused from the agent's cache
    computed_tokens: int  # prefilled for this request
    output_tokens: int


@dataclass
class GenerationResult:
    agent_id: str
    text: str
    token_ids: list[int]
    stop_reason: StopReason
    stop_sequence: str | None
    usage: Usage
    time_to_first_token: float | None
    prefill_seconds: float
    decode_seconds: float
    queued_seconds: float
    # False when the finished turn could not be written to disk (disk full, read-only): the answer
    # is complete, but a restart would lose it. `save_error` says why.
    turn_saved: bool = True
    save_error: str | None = None
    durable_seconds: float = 0.0  # how long the answer waited for its turn to be on disk

    @property
    def decode_tokens_per_second(self) -> float:
        return self.usage.output_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.usage.computed_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


# Events, in order: Started, PrefillProgress*, TextDelta*, then exactly one of Finished / Failed.


@dataclass(frozen=True)
class Started:
    agent_id: str
    prompt_tokens: int
    cached_tokens: int
    created_agent: bool
    # Set when the agent's cache held this many tokens and the prompt left them at `cached_tokens`
    # (an edited or re-rendered history): the turn recomputed from there.
    diverged_from: int | None = None


@dataclass(frozen=True)
class PrefillProgress:
    done: int
    total: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | PrefillProgress | TextDelta | Finished | Failed
