"""Agents on three architectures, through the KV adapter: llama (plain KV caches), qwen2 (q/k/v
biases, an untied output layer) and gemma3 (sliding-window layers: rotating caches, here with a
32-token window that every test prompt wraps).

For each, whatever happens to an agent's cache between two turns (saved and reloaded after a
restart, forked, found again by prefix, decoded in a batch with others, preempted to disk and
resumed) the second turn's tokens are the ones an uninterrupted run gives. The same holds with the
KV cache quantized (SEMANTIC_MLX_KV_BITS): llama at 8 bits and gemma3 at 4 bits (its global layers
quantized, its sliding-window layers not), through the batch cache for quantized layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from semantic_core.engine.types import GenerationRequest
from tests.tiny_model import ARCHITECTURES, SLIDING_WINDOW, build_tiny_model

FIRST = "Agents keep their context in a KV cache; the cache is saved to disk and loaded again."
SECOND = "What is the capital of France? Paris is the capital of France."


# (architecture, KV bits): the quantized ones use wider heads (32 values, one group of 32).
CASES = [*((arch, None) for arch in ARCHITECTURES), ("llama", 8), ("gemma3", 4)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-kv{b}" if b else a for a, b in CASES])
def arch_loaded(request, tmp_path_factory):
    from semantic_core.model import kv
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    arch, bits = request.param
    hidden = 128 if bits else 64
    path = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, seed=3, hidden=hidden)
    fmt = kv.KVFormat(bits, 32) if bits else kv.UNQUANTIZED
    return arch, load_resolved(ResolvedModel(f"tiny-{arch}", path, "local-dir"), kv_format=fmt)


def request_for(engine, messages, **kw) -> GenerationRequest:
    kw.setdefault("temperature", 0.0)
    kw.setdefault("max_tokens", 12)
    return GenerationRequest(tokens=engine.render(messages).tokens, messages=messages, **kw)


def turn_two(engine, r1) -> list[int]:
    """Turn 2's prompt: it extends exactly what turn 1 left in the cache (the tiny models' answers are
    not text that re-tokenizes to the same ids, which a sliding-window cache could not trim back to)."""
    first = engine.render([{"role": "user", "content": FIRST}]).tokens
    suffix = engine.tokenizer.encode(
        f"<|im_end|>\n<|im_start|>user\n{SECOND}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    return [*first, *r1.token_ids, *suffix]


def two_turns(engine, agent_id: str | None = None, between=None):
    """Turn 1, then whatever `between` does to the engine (it may return another engine), then turn 2."""
    first = engine.render([{"role": "user", "content": FIRST}]).tokens
    r1 = engine.complete(GenerationRequest(tokens=first, max_tokens=12, temperature=0.0, agent_id=agent_id))
    if between is not None:
        engine = between(engine, r1) or engine
    r2 = engine.complete(
        GenerationRequest(tokens=turn_two(engine, r1), max_tokens=12, temperature=0.0, agent_id=agent_id)
    )
    return r1, r2


@pytest.fixture
def reference(arch_loaded, engine_factory):
    _, loaded = arch_loaded
    engine = engine_factory(loaded=loaded)
    r1, r2 = two_turns(engine, "ref")
    engine.stop()
    return r1, r2


def test_the_cache_kinds_are_the_architectures(arch_loaded):
    arch, loaded = arch_loaded
    kinds = loaded.info.cache_spec.kinds
    plain = "QuantizedKVCache" if loaded.info.kv_format.quantized else "KVCache"
    if arch == "gemma3":
        assert kinds == sorted([plain, "RotatingKVCache"])
        windows = {layer.window for layer in loaded.info.cache_spec.layers if layer.window}
        assert windows == {SLIDING_WINDOW}
    else:
        assert kinds == [plain]


def test_persist_and_resume_after_a_restart(arch_loaded, engine_factory, tmp_path, reference):
    _, loaded = arch_loaded
    cache = tmp_path / f"persist-{arch_loaded[0]}"

    def restart(engine, _):
        engine.stop()
        return engine_factory(loaded=loaded, agent_cache_dir=cache)

    r1, r2 = two_turns(engine_factory(loaded=loaded, agent_cache_dir=cache), "kept", restart)
    assert (r1.token_ids, r2.token_ids) == (reference[0].token_ids, reference[1].token_ids)
    assert r2.usage.cached_tokens > 0  # the file's cache was used, not recomputed


def test_evict_and_reload_in_one_process(arch_loaded, engine_factory, reference):
    _, loaded = arch_loaded

    def evict(engine, _):
        engine.evict_agent("cold")

    _, r2 = two_turns(engine_factory(loaded=loaded), "cold", evict)
    assert r2.token_ids == reference[1].token_ids and r2.usage.cached_tokens > 0


def test_a_fork_continues_exactly_like_its_parent(arch_loaded, engine_factory, reference):
    _, loaded = arch_loaded
    children = []

    def fork(engine, r1):
        engine.fork_agent("parent", "child")
        children.append(
            engine.complete(
                GenerationRequest(tokens=turn_two(engine, r1), max_tokens=12, temperature=0.0, agent_id="child")
            )
        )

    _, parent = two_turns(engine_factory(loaded=loaded), "parent", fork)
    assert parent.token_ids == children[0].token_ids == reference[1].token_ids
    assert children[0].usage.cached_tokens > 0


def test_a_stateless_client_is_found_by_prefix(arch_loaded, engine_factory, reference):
    _, loaded = arch_loaded
    r1, r2 = two_turns(engine_factory(loaded=loaded), None)
    assert r2.agent_id == r1.agent_id  # the resent conversation continued its agent
    assert r2.token_ids == reference[1].token_ids and r2.usage.cached_tokens > 0


def test_a_resent_conversation_whose_answer_re_tokenizes_differently(arch_loaded, engine_factory):
    """The client's copy of the answer, rendered again, need not be the ids the model generated: the
    divergent tail is trimmed (a wrapped sliding window cannot be: that agent starts over)."""
    arch, loaded = arch_loaded
    engine = engine_factory(loaded=loaded)
    m1 = [{"role": "user", "content": FIRST}]
    r1 = engine.complete(request_for(engine, m1, agent_id="chat"))
    m2 = [*m1, {"role": "assistant", "content": r1.text}, {"role": "user", "content": SECOND}]
    r2 = engine.complete(request_for(engine, m2, agent_id="chat"))
    fresh = engine_factory(loaded=loaded).complete(request_for(engine, m2, agent_id="alone"))
    assert r2.token_ids == fresh.token_ids
    if arch != "gemma3":
        assert r2.usage.cached_tokens >= len(engine.render(m1).tokens) - 1


def test_a_partial_prefix_forks_when_the_cache_allows_it(arch_loaded, engine_factory):
    arch, loaded = arch_loaded
    engine = engine_factory(loaded=loaded)
    shared = "Shared instructions for every conversation. " * 6
    a = [{"role": "user", "content": shared + "Question one?"}]
    b = [{"role": "user", "content": shared + "A different question two?"}]
    engine.complete(request_for(engine, a))
    forked = engine.complete(request_for(engine, b))
    fresh = engine_factory(loaded=loaded).complete(request_for(engine, b, agent_id="alone"))
    assert forked.token_ids == fresh.token_ids
    if arch == "gemma3":
        # The sliding window has moved past the shared prefix: there is nothing exact to share.
        assert forked.usage.cached_tokens == 0
    else:
        assert forked.usage.cached_tokens >= 64


def test_batched_decode_equals_one_at_a_time(arch_loaded, engine_factory):
    _, loaded = arch_loaded
    prompts = [FIRST, SECOND, "def add(a, b):\n    return a + b", "Hello, world! " * 6, "Bonjour le monde"]
    alone = engine_factory(loaded=loaded, mlx_max_batch_size=1)
    expected = [
        alone.complete(request_for(alone, [{"role": "user", "content": p}], max_tokens=20)).token_ids for p in prompts
    ]
    batched = engine_factory(loaded=loaded, mlx_max_batch_size=8)
    handles = [batched.submit(request_for(batched, [{"role": "user", "content": p}], max_tokens=20)) for p in prompts]
    assert [h.wait().token_ids for h in handles] == expected


def test_preemption_to_disk_and_back_gives_the_same_tokens(arch_loaded, engine_factory):
    _, loaded = arch_loaded
    prompts = [FIRST, SECOND, "The quick brown fox jumps over the lazy dog."]
    free = engine_factory(loaded=loaded)
    expected = [
        free.complete(request_for(free, [{"role": "user", "content": p}], max_tokens=90)).token_ids for p in prompts
    ]
    per_block = 64 * loaded.info.bytes_per_token
    tight = engine_factory(loaded=loaded, mlx_cache_budget_mb=4.5 * per_block / (1024 * 1024))
    handles = [tight.submit(request_for(tight, [{"role": "user", "content": p}], max_tokens=90)) for p in prompts]
    assert [h.wait().token_ids for h in handles] == expected
    assert tight.snapshot(fresh=True).evictions > 0


def test_a_file_of_another_architecture_is_refused(arch_loaded, engine_factory, tmp_path):
    """Same folder, other model: the agent is listed as incompatible and never loaded into it."""
    arch, loaded = arch_loaded
    cache = tmp_path / f"mixed-{arch}"
    engine = engine_factory(loaded=loaded, agent_cache_dir=cache)
    engine.complete(request_for(engine, [{"role": "user", "content": FIRST}], agent_id="theirs"))
    engine.stop()
    from semantic_core.model.loader import load_resolved
    from semantic_core.model.registry import ResolvedModel

    other_arch = next(a for a in ARCHITECTURES if a != arch)
    other = load_resolved(
        ResolvedModel(
            other_arch, build_tiny_model(Path(tmp_path / f"o-{other_arch}"), arch=other_arch, seed=3), "local-dir"
        )
    )
    second = engine_factory(loaded=other, agent_cache_dir=cache)
    info = next(a for a in second.list_agents() if a.id == "theirs")
    assert not info.compatible and info.tier == "cold"
