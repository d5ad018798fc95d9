"""Agent memory with real files and real MLX arrays on the tiny model: persistence, tiers, eviction,
forks, model mismatch, corruption."""

from __future__ import annotations

import numpy as np
import pytest

from semantic_core.agents import disk
from semantic_core.engine.types import GenerationRequest
from semantic_core.errors import AgentBusy, AgentDamaged, AgentNotFound, ModelMismatch, StorageError


def turn(engine, agent_id, history, text, max_tokens=12):
    messages = [*history, {"role": "user", "content": text}]
    rendered = engine.render(messages)
    result = engine.complete(
        GenerationRequest(
            tokens=rendered.tokens, max_tokens=max_tokens, temperature=0.0, agent_id=agent_id, messages=messages
        )
    )
    return result, [*messages, {"role": "assistant", "content": result.text}]


def memory_layers(engine, agent_id):
    def op():
        cache = engine.residency.cache(agent_id)
        return [(np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])) for c in cache]

    return engine.call(op)


def test_saved_cache_round_trips_bit_exact(tiny_engine):
    turn(tiny_engine, "rt", [], "Hello, world!")
    tiny_engine.save_agent("rt")
    in_memory = memory_layers(tiny_engine, "rt")
    header, on_disk = disk.read_agent_file(
        disk.agent_path(tiny_engine.settings.agents_dir, "rt"), tiny_engine.info.fingerprint
    )
    assert len(on_disk) == len(in_memory) == tiny_engine.info.num_layers
    for (k1, v1), state in zip(in_memory, on_disk, strict=True):
        k2, v2 = state.arrays["keys"], state.arrays["values"]
        assert k1.dtype == k2.dtype and np.array_equal(k1, k2) and np.array_equal(v1, v2)
    assert len(header.tokens) == k2.shape[2]
    assert header.record.messages[-1]["role"] == "assistant"


def test_generation_after_restart_equals_generation_without_one(engine_factory, tmp_path):
    ref = engine_factory(agent_cache_dir=tmp_path / "ref")
    _, hist = turn(ref, "story", [], "The quick brown fox jumps over the lazy dog.")
    expected, _ = turn(ref, "story", hist, "What next?", max_tokens=20)
    ref.stop()

    first = engine_factory(agent_cache_dir=tmp_path / "persist")
    _, hist2 = turn(first, "story", [], "The quick brown fox jumps over the lazy dog.")
    first.stop()  # saves hot agents

    second = engine_factory(agent_cache_dir=tmp_path / "persist")
    listed = {a.id: a for a in second.list_agents()}
    assert listed["story"].tier == "cold" and listed["story"].tokens > 0
    _, history = second.get_agent("story")
    # The conversation text survives a restart (answers also keep how they were made, under "meta").
    assert [(m["role"], m["content"]) for m in history] == [(m["role"], m["content"]) for m in hist2]
    assert history[-1]["meta"]["output_tokens"] > 0
    resumed, _ = turn(second, "story", history, "What next?", max_tokens=20)
    assert resumed.token_ids == expected.token_ids
    # Loaded, not recomputed: at least the first turn's prompt (the tiny model's random reply may
    # tokenize differently when the client sends it back).
    first_prompt = len(second.render(hist2[:1]).tokens)
    assert resumed.usage.cached_tokens >= first_prompt


def test_least_recently_used_idle_agent_is_evicted_first(engine_factory):
    engine = engine_factory(agent_max_agents_in_memory=2)
    turn(engine, "a", [], "one")
    turn(engine, "b", [], "two")
    turn(engine, "a", [], "one again")  # a is now more recent than b
    turn(engine, "c", [], "three")
    tiers = {a.id: a.tier for a in engine.list_agents()}
    assert tiers == {"a": "hot", "b": "cold", "c": "hot"}
    assert engine.snapshot(fresh=True).evictions >= 1


def test_pinned_agent_stays_hot_under_pressure(engine_factory):
    engine = engine_factory(agent_max_agents_in_memory=2)
    turn(engine, "keep", [], "pinned one")
    engine.pin_agent("keep")
    for name in ("x", "y", "z"):
        turn(engine, name, [], f"agent {name}")
    tiers = {a.id: a.tier for a in engine.list_agents()}
    assert tiers["keep"] == "hot"
    assert sum(1 for t in tiers.values() if t == "hot") == 2


def test_budget_caps_hot_memory_under_many_agents(engine_factory, tiny_loaded):
    per_block = 64 * tiny_loaded.info.bytes_per_token
    engine = engine_factory(mlx_cache_budget_mb=6 * per_block / (1024 * 1024))
    assert engine.pool.capacity == 6
    seen = []
    engine.add_listener(lambda snap: seen.append((snap.pool_used, snap.pool_capacity)))
    for i in range(10):
        turn(engine, f"agent-{i}", [], f"Agent number {i} says hello to the world. " * 2, max_tokens=20)
    snap = engine.snapshot(fresh=True)
    assert all(used <= cap for used, cap in seen)
    assert snap.evictions >= 4
    assert sum(a.blocks for a in snap.agents) <= snap.pool_capacity
    # Every evicted agent is on disk and comes back.
    for info in engine.list_agents():
        assert info.on_disk or info.tier == "hot"
    engine.load_agent("agent-0")
    assert {a.id: a.tier for a in engine.list_agents()}["agent-0"] == "hot"


def test_fork_shares_prefix_blocks_until_it_writes(tiny_engine):
    turn(tiny_engine, "parent", [], "Shared history. " * 30, max_tokens=4)
    parent = {a.id: a for a in tiny_engine.list_agents()}["parent"]
    assert parent.tokens >= 128
    child = tiny_engine.fork_agent("parent", "child")
    assert child.tokens == parent.tokens
    assert child.shared_blocks == parent.tokens // 64 >= 2
    assert tiny_engine.snapshot(fresh=True).pool_shared >= 2
    # The child's first turn copies its cache into the batch: the shared blocks become its own.
    _, hist = tiny_engine.get_agent("child")
    turn(tiny_engine, "child", hist, "diverge here")
    after = {a.id: a for a in tiny_engine.list_agents()}
    assert after["child"].shared_blocks == 0
    assert after["parent"].tokens == parent.tokens  # copy on write: the parent is untouched


def test_agent_from_another_model_is_refused_not_used(engine_factory, tmp_path, tiny_model_dir):
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel
    from tests.tiny_model import build_tiny_model

    first = engine_factory(agent_cache_dir=tmp_path / "shared")
    turn(first, "mine", [], "Hello")
    first.stop()
    other_dir = build_tiny_model(tmp_path / "other-model", seed=7)
    other = load_resolved(ResolvedModel("other", other_dir, "local-dir"))
    assert other.info.fingerprint != first.info.fingerprint
    second = engine_factory(loaded=other, agent_cache_dir=tmp_path / "shared")
    info = {a.id: a for a in second.list_agents()}["mine"]
    assert info.compatible is False
    with pytest.raises(ModelMismatch, match="another model"):
        turn(second, "mine", [], "Hello")
    with pytest.raises(ModelMismatch):
        second.load_agent("mine")
    # Nothing was overwritten: the first model still loads it.
    assert (
        disk.read_header(disk.agent_path(tmp_path / "shared" / "agents", "mine")).fingerprint == first.info.fingerprint
    )


def test_corrupted_file_is_quarantined_and_reported(engine_factory, tmp_path):
    first = engine_factory(agent_cache_dir=tmp_path / "c")
    turn(first, "good", [], "Hello")
    turn(first, "bad", [], "Hello there")
    first.stop()
    path = tmp_path / "c" / "agents" / "bad.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # flip bytes in the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    second = engine_factory(agent_cache_dir=tmp_path / "c")
    with pytest.raises(AgentDamaged, match="quarantined"):
        turn(second, "bad", [], "Hello there")
    listed = {a.id: a for a in second.list_agents()}
    assert listed["bad"].tier == "damaged" and "checksum" in listed["bad"].damaged
    assert listed["good"].tier == "cold"
    quarantined = list((tmp_path / "c" / "quarantine").glob("bad.safetensors.*"))
    assert any(p.name.endswith(".reason.txt") for p in quarantined)
    assert not path.exists()
    assert second.snapshot(fresh=True).quarantined == 1
    turn(second, "good", [], "Hello")  # the engine carries on


def test_truncated_file_is_quarantined_at_startup(engine_factory, tmp_path):
    first = engine_factory(agent_cache_dir=tmp_path / "t")
    turn(first, "cut", [], "Hello")
    first.stop()
    path = tmp_path / "t" / "agents" / "cut.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    # The file alone: a turn journal left behind (its removal races with shutdown) would recover the
    # conversation, and the agent would rightly be cold rather than damaged.
    disk.journal_path(tmp_path / "t" / "agents", "cut").unlink(missing_ok=True)
    second = engine_factory(agent_cache_dir=tmp_path / "t")
    listed = {a.id: a for a in second.list_agents()}
    assert listed["cut"].tier == "damaged"
    assert list((tmp_path / "t" / "quarantine").glob("cut.safetensors.*"))


def test_failed_save_keeps_the_agent_hot_and_the_old_file(engine_factory, monkeypatch):
    engine = engine_factory()
    _, hist = turn(engine, "first", [], "Hello")
    engine.save_agent("first")
    path = disk.agent_path(engine.settings.agents_dir, "first")
    before = path.read_bytes()

    def full_disk(*a, **k):
        raise StorageError("could not save agent: [Errno 28] No space left on device")

    monkeypatch.setattr(disk, "write_agent_file", full_disk)
    turn(engine, "first", hist, "more words")  # its write-through save fails in the background
    with pytest.raises(StorageError, match="No space"):
        engine.save_agent("first")
    with pytest.raises(StorageError):
        engine.evict_agent("first")  # never dropped from memory unsaved
    info = {a.id: a for a in engine.list_agents()}["first"]
    assert info.tier == "hot" and info.dirty and "No space" in info.save_error
    assert path.read_bytes() == before


def test_agent_operations(tiny_engine):
    created = tiny_engine.create_agent("ops", display_name="Ops", system_prompt="Be brief.")
    assert created.name == "Ops" and created.system_prompt == "Be brief." and created.on_disk
    renamed = tiny_engine.rename_agent("ops", "Operations")
    assert renamed.name == "Operations"
    turn(tiny_engine, "ops", [], "hi")
    tiny_engine.evict_agent("ops")
    assert {a.id: a.tier for a in tiny_engine.list_agents()}["ops"] == "cold"
    tiny_engine.rename_agent("ops", "Ops again")  # a cold agent's record is rewritten on disk
    header = disk.read_header(disk.agent_path(tiny_engine.settings.agents_dir, "ops"))
    assert header.record.display_name == "Ops again" and len(header.tokens) > 0
    tiny_engine.delete_agent("ops")
    assert not disk.agent_path(tiny_engine.settings.agents_dir, "ops").exists()
    with pytest.raises(AgentNotFound):
        tiny_engine.get_agent("ops")


def test_busy_agent_cannot_be_deleted(tiny_engine):
    rendered = tiny_engine.render([{"role": "user", "content": "long"}])
    handle = tiny_engine.submit(GenerationRequest(tokens=rendered.tokens, max_tokens=400, agent_id="busy"))
    next(iter(handle))  # started
    with pytest.raises(AgentBusy):
        tiny_engine.delete_agent("busy")
    handle.cancel()
    handle.wait()


def test_agent_ids_cannot_escape_the_folder(tiny_engine):
    from semantic_core.errors import InvalidAgentId

    for bad in ("../etc", "a/b", ".hidden", "", "x" * 65, "a\x00b"):
        with pytest.raises(InvalidAgentId):
            tiny_engine.create_agent(bad)
