"""Quantized KV caches (SEMANTIC_MLX_KV_BITS): the batch cache for quantized layers, the pool and the
files following the format, formats kept apart on disk, and the real model served at 8 bits.

The cache operations on quantized caches (restart, evict, fork, prefix reuse, batching, preemption)
are covered per architecture in test_architectures.py."""

from __future__ import annotations

import anthropic
import mlx.core as mx
import pytest

from semantic_core.config import Settings
from semantic_core.engine.types import GenerationRequest
from semantic_core.errors import ModelMismatch
from semantic_core.model import kv

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# Settings and formats ------------------------------------------------------------------------------


def test_the_kv_settings_parse_and_refuse_what_cannot_work():
    assert Settings(_env_file=None, mlx_kv_bits="8").mlx_kv_bits == "8"
    assert Settings(_env_file=None, mlx_kv_bits=4).mlx_kv_bits == "4"
    assert Settings(_env_file=None, mlx_kv_bits=" None ").mlx_kv_bits == "none"
    with pytest.raises(ValueError):
        Settings(_env_file=None, mlx_kv_bits="3")
    with pytest.raises(ValueError):
        Settings(_env_file=None, mlx_kv_group_size=48)
    assert kv.KVFormat.parse("8", 32).tag == "q8g32"
    assert kv.KVFormat.parse("none").tag == "none"


def test_auto_picks_each_models_measured_recommendation():
    from semantic_core.model.fetch import WHEEL_MODELS
    from semantic_core.model.loader import kv_format_for

    for alias, spec in WHEEL_MODELS.items():
        assert kv_format_for(alias, "auto").tag == kv.KVFormat.parse(spec.kv_bits).tag
    assert kv_format_for("some/other-model", "auto") == kv.UNQUANTIZED  # nothing measured: unquantized
    assert kv_format_for("smollm2-135m-instruct", "4", 32).tag == "q4g32"  # a setting wins over auto


# The batch cache ------------------------------------------------------------------------------------


def _quantized_cache(tokens: int, seed: int, bits: int = 8) -> object:
    from mlx_lm.models.cache import QuantizedKVCache

    cache = QuantizedKVCache(group_size=32, bits=bits)
    mx.random.seed(seed)
    if tokens:
        cache.update_and_fetch(mx.random.normal((1, 2, tokens, 64)), mx.random.normal((1, 2, tokens, 64)))
    return cache


def _same(a, b) -> bool:
    if (a.keys is None) or (b.keys is None):
        return a.keys is None and b.keys is None and a.offset == b.offset
    ka, va = a.keys_and_values() if hasattr(a, "keys_and_values") else (a.keys, a.values)
    kb, vb = b.keys_and_values() if hasattr(b, "keys_and_values") else (b.keys, b.values)
    return a.offset == b.offset and all(
        mx.array_equal(x, y).item() for x, y in zip((*ka, *va), (*kb, *vb), strict=True)
    )


def test_quantized_caches_merge_into_a_batch_and_come_back_exactly():
    from semantic_core.model.kv_batch import BatchQuantizedKVCache

    caches = [_quantized_cache(n, seed) for seed, n in enumerate((5, 300, 0, 17))]
    batch = kv.merge([[c] for c in caches])[0]
    assert isinstance(batch, BatchQuantizedKVCache) and batch.bits == 8 and batch.group_size == 32
    for i, c in enumerate(caches):
        assert _same(batch.extract(i), c)
    # A decode step for all four: each one's cache gains exactly its token.
    step_k, step_v = mx.random.normal((4, 2, 1, 64)), mx.random.normal((4, 2, 1, 64))
    batch.update_and_fetch(step_k, step_v)
    for i, c in enumerate(caches):
        c.update_and_fetch(step_k[i : i + 1], step_v[i : i + 1])
        assert _same(batch.extract(i), c)
    # Leave (filter), then join another batch (extend): membership follows, contents stay.
    batch.filter([1, 3])
    assert _same(batch.extract(0), caches[1]) and _same(batch.extract(1), caches[3])
    newcomer = _quantized_cache(40, 9)
    batch.extend(BatchQuantizedKVCache.merge([newcomer]))
    assert [_same(batch.extract(i), c) for i, c in enumerate((caches[1], caches[3], newcomer))] == [True] * 3
    # The mask hides every sequence's left padding.
    mask = batch.make_mask(1)
    # The newcomer attends to its 40 tokens and the one being decoded, none of the padding.
    assert mask.shape[0] == 3 and int(mx.sum(mask[2]).item()) == 40 + 1


def test_a_right_padded_prefill_is_rolled_to_left_padding():
    """mlx-lm's batch prefill pads prompts on the right, then `finalize` moves the padding to the left:
    each sequence comes back holding exactly its own tokens, as if it had been prefilled alone."""
    from mlx_lm.models.cache import QuantizedKVCache

    from semantic_core.model.kv_batch import BatchQuantizedKVCache

    mx.random.seed(11)
    lengths = [3, 5, 1]
    keys, values = mx.random.normal((3, 2, 5, 64)), mx.random.normal((3, 2, 5, 64))
    batch = BatchQuantizedKVCache([0, 0, 0], group_size=32, bits=8)
    batch.prepare(right_padding=[5 - n for n in lengths])
    batch.update_and_fetch(keys, values)
    batch.finalize()
    assert batch.left_padding.tolist() == [2, 0, 4] and batch.offset.tolist() == lengths
    for i, n in enumerate(lengths):
        alone = QuantizedKVCache(group_size=32, bits=8)
        alone.update_and_fetch(keys[i : i + 1, :, :n], values[i : i + 1, :, :n])
        assert _same(batch.extract(i), alone), i


def test_caches_of_two_formats_never_share_a_batch():
    from semantic_core.model.kv_batch import BatchQuantizedKVCache

    with pytest.raises(ValueError, match="different formats"):
        BatchQuantizedKVCache.merge([_quantized_cache(4, 1, bits=8), _quantized_cache(4, 2, bits=4)])


# The real model at 8 bits -------------------------------------------------------------------------


@pytest.mark.real_model
def test_8bit_kv_serves_the_real_model_with_a_bigger_pool_and_smaller_files(
    engine_factory, real_loaded, real_loaded_kv8, tmp_path
):
    plain = engine_factory(loaded=real_loaded, mlx_cache_budget_mb=64)
    small = engine_factory(loaded=real_loaded_kv8, mlx_cache_budget_mb=64, agent_cache_dir=tmp_path / "kv8")
    info = small.info
    assert info.kv_description == "8-bit, group 64"
    # 30 layers x 3 KV heads x (64 code bytes + 2 x 2 float32 parameters) x (keys + values)
    assert info.bytes_per_token == 30 * 3 * 2 * (64 + 2 * 4) == 12960
    assert plain.info.bytes_per_token == 46080
    assert small.pool.capacity >= 3.5 * plain.pool.capacity
    assert info.fingerprint != plain.info.fingerprint  # a cache of one format is never read as another

    r = small.complete(
        GenerationRequest(tokens=small.render(PROMPT).tokens, max_tokens=20, temperature=0.0, agent_id="q")
    )
    assert "Paris" in r.text
    small.save_agent("q")
    from semantic_core.agents.disk import read_header

    header = read_header(tmp_path / "kv8" / "agents" / "q.safetensors")
    assert header.format == "3" and header.kv_format == "q8g64"
    assert {layer["kind"] for layer in header.layers} == {"QuantizedKVCache"}
    tokens = len(header.tokens)
    assert header.size_bytes < tokens * info.bytes_per_token + 64 * 1024  # the codes, not float32
    # After a restart the agent answers from its file: the cache is read, not recomputed.
    small.stop()
    again = engine_factory(loaded=real_loaded_kv8, agent_cache_dir=tmp_path / "kv8")
    follow = [*PROMPT, {"role": "assistant", "content": r.text}, {"role": "user", "content": "And of Italy?"}]
    r2 = again.complete(
        GenerationRequest(tokens=again.render(follow).tokens, max_tokens=20, temperature=0.0, agent_id="q")
    )
    assert r2.usage.cached_tokens >= tokens - 2 and "Rome" in r2.text


@pytest.mark.real_model
def test_a_server_with_another_kv_format_refuses_the_file_saying_why(
    engine_factory, real_loaded, real_loaded_kv8, tmp_path
):
    folder = tmp_path / "shared"
    q = engine_factory(loaded=real_loaded_kv8, agent_cache_dir=folder)
    q.complete(GenerationRequest(tokens=q.render(PROMPT).tokens, max_tokens=5, temperature=0.0, agent_id="q8"))
    q.stop()
    plain = engine_factory(loaded=real_loaded, agent_cache_dir=folder)
    info = next(a for a in plain.list_agents() if a.id == "q8")
    assert not info.compatible
    with pytest.raises(ModelMismatch, match=r"KV format 'q8g64'.*keeps 'none'"):
        plain.load_agent("q8")
    # Rehoming keeps the conversation and drops the cache: the agent then works on this server.
    plain.rehome_agent("q8")
    r = plain.complete(
        GenerationRequest(tokens=plain.render(PROMPT).tokens, max_tokens=20, temperature=0.0, agent_id="q8")
    )
    assert "Paris" in r.text


@pytest.mark.real_model
def test_a_format_2_file_from_before_kv_formats_still_loads(engine_factory, real_loaded, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "old"
    engine = engine_factory(loaded=real_loaded, agent_cache_dir=folder)
    r = engine.complete(
        GenerationRequest(tokens=engine.render(PROMPT).tokens, max_tokens=12, temperature=0.0, agent_id="old")
    )
    engine.stop()
    path = folder / "agents" / "old.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata())
    assert meta.pop("semantic.kv_format") == "none"
    meta["semantic.format"] = "2"
    save_file(load_file(str(path)), str(path), metadata=meta)  # what a format-2 writer left

    again = engine_factory(loaded=real_loaded, agent_cache_dir=folder)
    follow = [*PROMPT, {"role": "assistant", "content": r.text}, {"role": "user", "content": "And of Italy?"}]
    r2 = again.complete(
        GenerationRequest(tokens=again.render(follow).tokens, max_tokens=12, temperature=0.0, agent_id="old")
    )
    assert r2.usage.cached_tokens > 20


@pytest.mark.real_model
def test_8bit_kv_through_the_messages_api_reads_its_cache_on_the_second_turn(server_factory, real_loaded_kv8):
    server = server_factory(loaded=real_loaded_kv8)
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    headers = {"X-Agent-ID": "kv8-chat"}
    first = client.messages.create(
        model="smollm2-135m-instruct",
        max_tokens=20,
        extra_body={"temperature": 0},
        extra_headers=headers,
        messages=PROMPT,
    )
    assert "Paris" in first.content[0].text
    second = client.messages.create(
        model="smollm2-135m-instruct",
        max_tokens=20,
        extra_body={"temperature": 0},
        extra_headers=headers,
        messages=[
            *PROMPT,
            {"role": "assistant", "content": first.content[0].text},
            {"role": "user", "content": "Thanks!"},
        ],
    )
    assert second.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens - 2
