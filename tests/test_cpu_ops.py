"""The NumPy-exponential attention and SwiGLU give what MLX's own functions give, in every mask form."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from semantic_core.model import cpu_ops


def reference(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "rows", "span", "mask_kind"),
    [
        (1, 9, 3, 43, 300, "causal"),  # a new turn on a history, grouped-query heads
        (1, 4, 4, 17, 17, "causal"),  # a first chunk, one KV head per query head
        (2, 6, 2, 5, 40, "bool"),  # batched prefill with left padding
        (2, 6, 2, 5, 40, "bool-per-head"),
        (1, 6, 3, 7, 30, "additive"),
        (1, 6, 3, 7, 30, None),
    ],
)
def test_attention_matches_mlx(batch, heads, kv_heads, rows, span, mask_kind, monkeypatch):
    # Small blocks, so that every case also goes through several blocks of query rows.
    monkeypatch.setattr(cpu_ops, "BLOCK_ELEMENTS", 2048)
    mx.random.seed(7)
    q = mx.random.normal((batch, heads, rows, 64))
    k = mx.random.normal((batch, kv_heads, span, 64))
    v = mx.random.normal((batch, kv_heads, span, 64))
    mask = mask_kind
    if mask_kind == "bool":
        mask = mx.random.uniform(shape=(batch, 1, rows, span)) > 0.3
        mask[..., -1] = True  # every row attends to something
    elif mask_kind == "bool-per-head":
        mask = mx.random.uniform(shape=(batch, heads, rows, span)) > 0.3
        mask[..., -1] = True
    elif mask_kind == "additive":
        mask = mx.random.normal((batch, 1, rows, span))
    ours = cpu_ops.cpu_attention(q, k, v, 0.125, mask)
    expected = reference(q, k, v, 0.125, mask)
    assert ours.shape == expected.shape
    assert float(mx.max(mx.abs(ours - expected))) < 1e-5


def test_large_scores_stay_finite_and_exact():
    q = mx.full((1, 2, 3, 8), 40.0)
    k = mx.full((1, 2, 5, 8), 40.0)
    v = mx.random.normal((1, 2, 5, 8))
    ours = cpu_ops.cpu_attention(q, k, v, 1.0, "causal")
    assert bool(mx.all(mx.isfinite(ours)))
    assert float(mx.max(mx.abs(ours - reference(q, k, v, 1.0, "causal")))) < 1e-5


def test_swiglu_matches_mlx_and_handles_extreme_gates():
    from mlx_lm.models.activations import swiglu

    gate = mx.concatenate(
        [mx.random.normal((2, 5, 64)) * 6, mx.full((2, 1, 64), -200.0), mx.full((2, 1, 64), 200.0)], axis=1
    )
    up = mx.random.normal((2, 7, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from NumPy
        ours = cpu_ops.cpu_swiglu(gate, up)
    expected = swiglu(gate, up)
    assert np.allclose(np.array(ours), np.array(expected), rtol=1e-5, atol=1e-5)


def test_install_routes_prompt_chunks_only_and_uninstall_restores(tiny_loaded):
    import sys

    model = tiny_loaded.model
    module = sys.modules[type(model).__module__]
    # The options belong to the module (llama here, SmolLM2's too): put back what the loader set.
    before = {n: dict(getattr(getattr(module, n), "options", {})) for n in ("scaled_dot_product_attention", "swiglu")}
    cpu_ops.uninstall(model)
    original = module.scaled_dot_product_attention
    try:
        assert sorted(cpu_ops.install(model)) == ["scaled_dot_product_attention", "swiglu"]
        assert cpu_ops.install(model)  # a second install does not wrap twice
        assert module.scaled_dot_product_attention.semantic_original is original
        calls = []
        real = cpu_ops.cpu_attention

        def spy(*args, **kwargs):
            calls.append(args[0].shape[2])
            return real(*args, **kwargs)

        cpu_ops.cpu_attention = spy
        try:
            from mlx_lm.models.cache import make_prompt_cache

            cache = make_prompt_cache(model)
            with_ours = model(mx.array([[1, 2, 3, 4, 5, 6]]), cache=cache)
            model(mx.array([[7]]), cache=cache)  # a decode step keeps MLX's attention
        finally:
            cpu_ops.cpu_attention = real
        assert calls and set(calls) == {6}
        cpu_ops.uninstall(model)
        assert module.scaled_dot_product_attention is original
        plain = model(mx.array([[1, 2, 3, 4, 5, 6]]), cache=make_prompt_cache(model))
        assert float(mx.max(mx.abs(with_ours - plain))) < 1e-4
    finally:
        cpu_ops.install(model)
        for name, options in before.items():
            getattr(module, name).options.update(options)


def test_decode_pipelining_hands_every_nth_layer_to_mlx_during_decode_only(tiny_loaded, monkeypatch):
    """Every `every`-th decoder layer evaluates its output asynchronously on a decode step (one row per
    sequence), never on a prompt chunk, and the logits are those of a step evaluated once."""
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny_loaded.model
    layers = list(model.layers)
    before = [type(layer) for layer in layers]
    calls = []
    real_async_eval = mx.async_eval

    def spy(*arrays):
        calls.append(len(arrays))
        return real_async_eval(*arrays)

    def run():
        cache = make_prompt_cache(model)
        model(mx.array([[1, 2, 3, 4, 5, 6]]), cache=cache)
        prompt_calls = len(calls)
        logits = model(mx.array([[7]]), cache=cache)
        mx.eval(logits)
        return prompt_calls, len(calls) - prompt_calls, logits

    monkeypatch.setattr(mx, "async_eval", spy)
    try:
        assert cpu_ops.install_decode_pipelining(model, 0) == 0
        calls.clear()
        assert run()[:2] == (0, 0)
        plain = run()[2]
        every = 2
        assert cpu_ops.install_decode_pipelining(model, every) == len(layers) // every
        calls.clear()
        prompt_calls, decode_calls, piped = run()
        assert prompt_calls == 0 and decode_calls == len(layers) // every
        assert mx.array_equal(piped, plain).item()
    finally:
        for layer, cls in zip(layers, before, strict=True):
            layer.__class__ = cls
