"""Switching models: one process serves one model; agents of another model are kept, listed as such,
answer 409 until they are explicitly moved (`POST /v1/agents/{id}/rehome`), and then continue on the
loaded model with their conversation (recomputed once) intact, across restarts too."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.tiny_model import build_tiny_model

H = {"x-api-key": "test"}  # a header a browser form cannot send (the cross-site guard wants one)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    path = build_tiny_model(tmp_path_factory.mktemp("switch-qwen2"), arch="qwen2", seed=5)
    return load_resolved(ResolvedModel("tiny-qwen2", path, "local-dir"))


def _client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0)


def test_an_agent_of_another_model_answers_409_until_rehomed(server_factory, tiny_qwen2, tmp_path):
    cache = tmp_path / "shared-agents"
    first_turn = [{"role": "user", "content": "Remember the word lighthouse."}]
    llama = server_factory(agent_cache_dir=cache)
    answer = _client(llama).messages.create(
        model="tiny", max_tokens=8, messages=first_turn, extra_headers={"X-Agent-ID": "keeper"}
    )
    llama.stop()

    qwen = server_factory(loaded=tiny_qwen2, agent_cache_dir=cache)
    listed = {a["id"]: a for a in httpx.get(f"{qwen.url}/v1/agents").json()["data"]}
    assert listed["keeper"]["compatible"] is False and listed["keeper"]["tier"] == "cold"

    conversation = [
        *first_turn,
        {"role": "assistant", "content": answer.content[0].text or "ok"},
        {"role": "user", "content": "Which word?"},
    ]
    with pytest.raises(anthropic.ConflictError) as refused:
        _client(qwen).messages.create(
            model="tiny-qwen2", max_tokens=8, messages=conversation, extra_headers={"X-Agent-ID": "keeper"}
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "/v1/agents/keeper/rehome" in refused.value.body["error"]["message"]

    moved = httpx.post(f"{qwen.url}/v1/agents/keeper/rehome", headers=H)
    assert moved.status_code == 200 and moved.json()["compatible"] is True and moved.json()["tokens"] == 0
    again = httpx.post(f"{qwen.url}/v1/agents/keeper/rehome", headers=H)
    assert again.status_code == 400 and "already belongs" in again.json()["error"]["message"]
    history = httpx.get(f"{qwen.url}/v1/agents/keeper").json()["history"]
    assert history[0] == {"role": "user", "content": "Remember the word lighthouse."}

    reply = _client(qwen).messages.create(
        model="tiny-qwen2", max_tokens=8, messages=conversation, extra_headers={"X-Agent-ID": "keeper"}
    )
    assert reply.usage.cache_read_input_tokens == 0  # the conversation was computed on this model
    assert reply.usage.input_tokens > 10
    qwen.stop()

    # The move was written: after a restart on the same model the agent is this model's, with its cache.
    restarted = server_factory(loaded=tiny_qwen2, agent_cache_dir=cache)
    info = httpx.get(f"{restarted.url}/v1/agents/keeper").json()
    assert info["compatible"] is True and info["tokens"] > 0


def test_rehoming_an_unknown_agent_is_404(api):
    r = httpx.post(f"{api.url}/v1/agents/nobody/rehome", headers=H)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
