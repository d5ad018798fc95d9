"""The turn service: one defaults policy for every front end (request, agent, model, settings)."""

from __future__ import annotations

import json
import shutil

import pytest

from semantic_core.agents.record import Sampling as AgentSampling
from semantic_core.turns import Turn, TurnService


@pytest.fixture(scope="module")
def model_with_generation_config(tiny_model_dir, tmp_path_factory):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    path = tmp_path_factory.mktemp("tiny-genconfig") / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1})
    )
    return load_resolved(ResolvedModel("tiny-genconfig", path, "local-dir"))


def test_each_field_comes_from_the_first_that_gives_it(engine_factory, model_with_generation_config):
    engine = engine_factory(loaded=model_with_generation_config, mlx_default_max_tokens=77)
    engine.create_agent("careful", sampling=AgentSampling(temperature=0.3, max_tokens=40))
    turns = TurnService(engine)
    agent = next(a for a in engine.snapshot(fresh=True).agents if a.id == "careful")

    chosen = turns.sampling(Turn(messages=[], top_p=0.5), agent)
    assert (chosen.top_p, chosen.sources["top_p"]) == (0.5, "request")
    assert (chosen.temperature, chosen.sources["temperature"]) == (0.3, "agent")
    assert (chosen.max_tokens, chosen.sources["max_tokens"]) == (40, "agent")
    assert (chosen.top_k, chosen.sources["top_k"]) == (20, "model")
    assert (chosen.repetition_penalty, chosen.sources["repetition_penalty"]) == (1.1, "model")
    assert (chosen.min_p, chosen.sources["min_p"]) == (0.0, "settings")

    no_agent = turns.sampling(Turn(messages=[]), None)
    assert (no_agent.temperature, no_agent.max_tokens) == (0.7, 77)


def test_the_model_can_be_left_out_of_the_policy(engine_factory, model_with_generation_config):
    engine = engine_factory(loaded=model_with_generation_config, mlx_model_sampling=False)
    chosen = TurnService(engine).sampling(Turn(messages=[]), None)
    assert chosen.temperature == 0.0 and chosen.sources["temperature"] == "settings"
    assert chosen.repetition_penalty is None and chosen.top_k == 0


def test_a_turn_without_a_temperature_is_greedy_by_default(tiny_engine):
    """The tiny model has no generation_config.json: the settings decide, and they say greedy."""
    turns = TurnService(tiny_engine)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    first = turns.start_sync(Turn(messages=messages)).handle.wait()
    again = turns.start_sync(Turn(messages=messages)).handle.wait()
    assert first.token_ids == again.token_ids


def test_a_named_agents_stored_system_prompt_applies_when_the_turn_gives_none(tiny_engine):
    tiny_engine.create_agent("pirate", system_prompt="You are a pirate.")
    turns = TurnService(tiny_engine)
    started = turns.start_sync(Turn(messages=[{"role": "user", "content": "hi"}], agent_id="pirate", max_tokens=2))
    started.handle.wait()
    assert "You are a pirate." in started.prompt.text
    plain = turns.start_sync(
        Turn(messages=[{"role": "user", "content": "hi"}], agent_id="pirate", max_tokens=2, system="Be brief.")
    )
    plain.handle.wait()
    assert "pirate" not in plain.prompt.text and "Be brief." in plain.prompt.text
