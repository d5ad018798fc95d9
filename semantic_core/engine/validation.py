"""Checking a request before it enters the engine: anything that could fail inside the loop, where
one bad request must never stop the engine for everyone, is refused (or normalised) here."""

from __future__ import annotations

import math

from semantic_core.agents.record import validate_agent_id
from semantic_core.engine.types import GenerationRequest
from semantic_core.errors import InvalidRequest, PromptTooLong, QueueFull
from semantic_core.model.loader import ModelInfo

# Temperatures below this sample greedily: logits / temperature overflow to inf below ~1e-37 and
# sampling turns random, while far above that the distribution is already a point mass on the argmax.
MIN_TEMPERATURE = 1e-5


def validate_request(req: GenerationRequest, info: ModelInfo, *, queue_depth: int, max_queue: int) -> None:
    """Refuse (or normalise) anything that could fail inside the loop, where one bad request
    must never stop the engine for everyone: every sampling parameter is checked against the
    model, and every token id against its vocabulary."""
    if not req.tokens:
        raise InvalidRequest("the prompt is empty")
    limit = info.context_length
    if len(req.tokens) >= limit:
        raise PromptTooLong(len(req.tokens), limit)
    vocab = info.vocab_size
    if vocab and (min(req.tokens) < 0 or max(req.tokens) >= vocab):
        raise InvalidRequest(f"the prompt holds token ids outside the model's vocabulary (0..{vocab - 1})")
    if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be an integer of at least 1")
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(req, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequest(f"{name}: must be a finite number")
    if req.temperature < 0:
        raise InvalidRequest("temperature: must be >= 0")
    if req.temperature < MIN_TEMPERATURE:
        # Logits / temperature overflow to inf below ~1e-37 and sampling turns random; far above
        # that the distribution is already a point mass on the argmax: sample greedily.
        req.temperature = 0.0
    if not 0 < req.top_p <= 1:
        raise InvalidRequest("top_p: must be in (0, 1]")
    if not 0 <= req.min_p < 1:
        raise InvalidRequest("min_p: must be in [0, 1)")
    if isinstance(req.top_k, bool) or not isinstance(req.top_k, int) or req.top_k < 0:
        raise InvalidRequest("top_k: must be an integer >= 0")
    if vocab and req.top_k >= vocab:
        req.top_k = 0  # the top `vocab` tokens are all of them: no filter (mlx-lm refuses k >= vocab)
    penalty = req.repetition_penalty
    if penalty is not None and (
        not isinstance(penalty, int | float) or not 0 < penalty <= 10 or not math.isfinite(penalty)
    ):
        raise InvalidRequest("repetition_penalty: must be in (0, 10]")
    if len(req.stop_sequences) > 64 or any(not isinstance(x, str) for x in req.stop_sequences):
        raise InvalidRequest("stop_sequences: at most 64 strings")
    if queue_depth >= max_queue:
        raise QueueFull(f"{queue_depth} requests are waiting; retry shortly")
    if req.agent_id is not None:
        validate_agent_id(req.agent_id)
