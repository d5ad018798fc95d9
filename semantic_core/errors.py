"""Domain errors raised by the core. The API maps each to one Anthropic error type in one place."""

from __future__ import annotations


class SemanticError(Exception):
    """Base of every error the core raises on purpose. `kind` names the class of failure."""

    kind = "api_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(SemanticError):
    kind = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    """Anthropic's own wording, which clients match (Claude Code reads the two numbers)."""

    def __init__(self, prompt_tokens: int, limit: int, *, estimated: bool = False) -> None:
        note = " (counted from its length: at least that many)" if estimated else ""
        super().__init__(
            f"prompt is too long: {prompt_tokens} tokens > {limit} maximum{note}; the model's context limit "
            f"is {limit} tokens"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class ContextOverflow(InvalidRequest):
    """The prompt fits, but not with the answer it asks room for (Anthropic's wording, which Claude
    Code reads to retry with a smaller max_tokens)."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int) -> None:
        super().__init__(
            f"input length and `max_tokens` exceed context limit: {prompt_tokens} + {max_tokens} > {limit}, "
            "decrease input length or `max_tokens` and try again"
        )
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit = limit


class AgentNotFound(SemanticError):
    kind = "not_found_error"

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} does not exist")
        self.agent_id = agent_id


class AgentExists(SemanticError):
    kind = "invalid_request_error"

    def __init__(self, agent_id: str, message: str | None = None) -> None:
        super().__init__(message or f"agent {agent_id!r} already exists")
        self.agent_id = agent_id


class AgentElsewhere(SemanticError):
    """Another live instance of the cluster owns the agent and did not hand it over in time. The
    request changed nothing: retrying it (after Retry-After) is safe."""

    kind = "overloaded_error"

    def __init__(self, agent_id: str, owner: str | None = None) -> None:
        where = f"instance {owner!r}" if owner else "another instance"
        super().__init__(f"agent {agent_id!r} is held by {where} of this cluster; retry shortly")
        self.agent_id = agent_id


class StoreFull(InvalidRequest):
    """SEMANTIC_AGENT_MAX_AGENTS agents exist and none may be recycled."""


class AgentBusy(SemanticError):
    """The agent is generating; the operation needs it idle."""

    kind = "invalid_request_error"

    def __init__(self, agent_id: str, action: str) -> None:
        super().__init__(f"agent {agent_id!r} is generating; cannot {action} it now (retry when it is idle)")
        self.agent_id = agent_id


class AgentDamaged(SemanticError):
    """The agent's file failed verification and was quarantined."""

    kind = "api_error"


class InvalidAgentId(InvalidRequest):
    pass


class ModelMismatch(SemanticError):
    """A saved cache belongs to a different model than the one loaded."""

    kind = "invalid_request_error"


class PoolExhausted(SemanticError):
    """The KV block pool cannot hold what was asked, even after evicting every idle agent."""

    kind = "overloaded_error"

    def __init__(self, message: str, *, never_fits: bool = False) -> None:
        super().__init__(message)
        self.never_fits = never_fits


class QueueFull(SemanticError):
    kind = "overloaded_error"


class ModelNotFound(SemanticError):
    kind = "not_found_error"


class ModelLoadError(SemanticError):
    """A model could not be fetched, converted or loaded; the message says why and what to do."""

    kind = "api_error"


class UnsupportedModel(ModelLoadError):
    pass


class StorageError(SemanticError):
    """Writing an agent to disk failed (disk full, permissions); the previous file is intact."""

    kind = "api_error"


class EngineFault(SemanticError):
    """An unexpected error while serving one request; the engine contained it and goes on."""

    kind = "api_error"


class EngineStopped(SemanticError):
    kind = "overloaded_error"

    def __init__(self, message: str = "the engine is shutting down") -> None:
        super().__init__(message)
