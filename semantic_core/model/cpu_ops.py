"""Prompt-chunk attention and SwiGLU for MLX's CPU backend, with NumPy's exponential.

On CPU, `mx.fast.scaled_dot_product_attention` runs as plain ops (scores, softmax, weighted sum), and
MLX's CPU `exp` costs about 12 ns per element on x86 where NumPy's vectorised one costs about 0.5 ns
(a multiply costs 0.2 ns either way). Exponentials therefore dominate a prompt chunk: the softmax of
attention over a long history, and the sigmoid inside SwiGLU (silu(gate) * up) in every MLP. The
matmuls (OpenBLAS) are not the problem. Measured here: a 2K-token prefill 1.7x faster, a 43-token
turn on a 4K-token history 1.8x faster (benchmarks/cpu_ops.py).

`cpu_attention` computes softmax(QK^T)V for blocks of query rows (so the scores stay small: past
about 32 MB every fresh MLX buffer costs page faults), with the exponential done by NumPy on the
evaluated scores; the weights go back to MLX for the weighted sum, normalised after it (on L x D
values rather than L x S). `cpu_swiglu` does the same for the MLP's gate. Both force evaluation in
the middle of a layer, so they serve prompt chunks only (more than one row per sequence), where the
engine evaluates each chunk at once anyway; decode steps keep MLX's functions and its asynchronous
evaluation.

`install(model)` swaps them into the model's module (mlx-lm models call `scaled_dot_product_attention`
and `swiglu` by the names they imported). Attention sinks and activations other than float32 keep
mlx-lm's functions. Attention over a quantized KV cache (SEMANTIC_MLX_KV_BITS) dequantizes the cache
(the CPU kernels' vectorised dequantize when built) and runs the float path: mlx-lm's quantized
attention is MLX's scalar CPU quantized matmul, about 2.5x slower on a prompt chunk. Only for the CPU
device (Metal and CUDA have real kernels); SEMANTIC_MLX_NUMPY_EXP=false turns the NumPy exponentials
off. Results match MLX's to about 1e-6.
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx
import numpy as np

_MASKED = -1e30  # what masked scores become (finite, as in MLX: a fully masked row stays finite)


# Scores are computed for blocks of query rows at most this large (elements): past about 32 MB a
# fresh MLX buffer costs page faults on every pass (elementwise ops slow from 0.2 to 2.3 ns per
# element), and a block that fits in the cache keeps the softmax passes cheap.
BLOCK_ELEMENTS = 1 << 21


def cpu_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: Any = None,
) -> mx.array:
    """softmax(scale * Q K^T + mask) V with grouped-query heads, like mx.fast.scaled_dot_product_attention.

    queries: (B, Hq, L, D) float32; keys, values: (B, Hkv, S, D) with Hq a multiple of Hkv; mask:
    None, "causal" (the L queries are the last L of the S positions), a boolean array (True =
    attend) or an additive float array, broadcastable to (B, Hq, L, S).
    """
    b, n_q, length, dim = queries.shape
    n_kv, span = keys.shape[1], keys.shape[2]
    rep = n_q // n_kv
    q = queries * mx.array(scale, dtype=queries.dtype)
    if rep > 1:
        q = q.reshape(b, n_kv, rep, length, dim)
        keys, values = keys[:, :, None], values[:, :, None]
        if isinstance(mask, mx.array):
            if mask.ndim >= 3 and mask.shape[-3] == n_q:
                mask = mask.reshape(*mask.shape[:-3], n_kv, rep, *mask.shape[-2:])
            else:
                mask = mx.expand_dims(mask, -3)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unsupported attention mask {mask!r}")
    keys_t = keys.swapaxes(-1, -2)
    rows = max(1, BLOCK_ELEMENTS // max(b * n_q * span, 1))
    outs = []
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        block_mask = mask
        if isinstance(mask, mx.array) and mask.shape[-2] == length:
            block_mask = mask[..., start:stop, :]
        outs.append(_attend(q[..., start:stop, :], keys_t, values, block_mask, span - length + start))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    if rep > 1:
        out = out.reshape(b, n_q, length, dim)
    return out.astype(queries.dtype)


def _attend(q: mx.array, keys_t: mx.array, values: mx.array, mask: Any, first_row: int) -> mx.array:
    """Attention of one block of query rows; `first_row` is its position among the keys."""
    scores = q @ keys_t
    masked = mx.array(_MASKED, dtype=scores.dtype)
    if isinstance(mask, str):
        span, n = keys_t.shape[-1], q.shape[-2]
        if n > 1 or first_row < span - 1:
            allowed = mx.arange(first_row, first_row + n)[:, None] >= mx.arange(span)[None]
            scores = mx.where(allowed, scores, masked)
    elif mask is not None:
        scores = mx.where(mask, scores, masked) if mask.dtype == mx.bool_ else scores + mask
    shifted = scores - mx.max(scores, axis=-1, keepdims=True)
    mx.eval(shifted)
    weights = mx.array(np.exp(np.asarray(shifted)))
    return (weights @ values) / mx.sum(weights, axis=-1, keepdims=True)


def cpu_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x = gate * x / (1 + e^-gate), the exponential by NumPy (see the module notes)."""
    mx.eval(gate, x)
    g = np.asarray(gate)
    with np.errstate(over="ignore"):  # e^-gate overflows to inf for gate < -88: the result is -0, right
        denominator = np.exp(-g)
    denominator += 1.0
    out = g * np.asarray(x)
    out /= denominator
    return mx.array(out)


def _dequantize_kv(triple: Any, group_size: int, bits: int) -> mx.array:
    """A quantized cache's keys or values (words, scales, biases; (B, H, S, .)) as float arrays."""
    words, scales, biases = triple
    if _kernels is not None:
        # The kernels' dequantize is 2-D (rows of the affine layout) and vectorised; MLX's is a
        # scalar loop on CPU.
        shape = words.shape
        flat = _kernels.dequantize(
            words.reshape(-1, shape[-1]),
            scales.reshape(-1, scales.shape[-1]),
            biases.reshape(-1, biases.shape[-1]),
            group_size,
            bits,
            dtype=scales.dtype,
        )
        out: mx.array = flat.reshape(*shape[:-1], flat.shape[-1])
        return out
    return mx.dequantize(words, scales, biases, group_size=group_size, bits=bits)


def _load_kernels() -> Any:
    try:
        import semantic_kernels

        return semantic_kernels
    except ImportError:
        return None


_kernels = _load_kernels()


# Query rows per sequence up to which attention runs as the kernels' one primitive (decode steps);
# longer prompt chunks keep the blocked float path with NumPy's exponential, whose score matmuls go
# through BLAS.
KERNEL_ATTENTION_ROWS = 8


def _make_sdpa(original: Any) -> Any:
    options = {"numpy_exp": True, "kernel_attention": False}  # set by install()

    def scaled_dot_product_attention(
        queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float, mask: Any, sinks: Any = None
    ) -> mx.array:
        quantized = hasattr(cache, "bits")
        if (
            options["kernel_attention"]
            and _kernels is not None
            and sinks is None
            and queries.dtype == mx.float32
            and queries.shape[2] <= KERNEL_ATTENTION_ROWS
            and (mask is None or isinstance(mask, (str, mx.array)))
        ):
            if quantized and keys[1].dtype == mx.float32:
                kernel_out: mx.array = _kernels.attention(
                    queries,
                    keys,
                    values,
                    scale=scale,
                    mask=mask,
                    group_size=int(cache.group_size),
                    bits=int(cache.bits),
                )
                return kernel_out
            if not quantized and keys.dtype == mx.float32:
                kernel_out = _kernels.attention(queries, keys, values, scale=scale, mask=mask)
                return kernel_out
        if quantized and sinks is None and queries.dtype == mx.float32:
            # MLX's CPU quantized matmul (mlx-lm's quantized attention) is a scalar loop: a prompt
            # chunk's scores cost ~4x the float path. Dequantizing the cache is linear in its size.
            keys = _dequantize_kv(keys, int(cache.group_size), int(cache.bits))
            values = _dequantize_kv(values, int(cache.group_size), int(cache.bits))
            if queries.shape[2] == 1 or not options["numpy_exp"]:
                out: mx.array = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
                return out
            return cpu_attention(queries, keys, values, scale, mask)
        if (
            queries.shape[2] == 1
            or sinks is not None
            or quantized
            or queries.dtype != mx.float32
            or not options["numpy_exp"]
        ):
            result: mx.array = original(queries, keys, values, cache, scale, mask, sinks)
            return result
        return cpu_attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention.options = options  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def _make_swiglu(original: Any) -> Any:
    options = {"numpy_exp": True, "kernel": False}  # set by install()

    def swiglu(gate: mx.array, x: mx.array) -> mx.array:
        if gate.dtype != mx.float32 or x.dtype != mx.float32:
            result: mx.array = original(gate, x)
            return result
        if options["kernel"] and _kernels is not None:
            # One primitive, vectorised exponential, no synchronisation: every shape.
            kernel_out: mx.array = _kernels.swiglu(gate, x)
            return kernel_out
        if gate.ndim < 2 or gate.shape[-2] == 1 or not options["numpy_exp"]:
            result = original(gate, x)
            return result
        return cpu_swiglu(gate, x)

    swiglu.options = options  # type: ignore[attr-defined]
    return swiglu


_REPLACEMENTS = {"scaled_dot_product_attention": _make_sdpa, "swiglu": _make_swiglu}


def install(model: Any, numpy_exp: bool = True, layer_kernels: bool = False) -> list[str]:
    """Route the model's prompt-chunk attention and SwiGLU through NumPy's exponential (numpy_exp),
    attention over quantized KV caches through dequantized float attention (always), and, when the
    CPU kernels are built (layer_kernels), decode attention (a few query rows, float or quantized
    caches) and every SwiGLU through the kernels' primitives.

    Returns the names that use NumPy's exponential in the model's module (none for an architecture
    that uses neither, or without numpy_exp). The last call's options hold for every model of the
    module.
    """
    module = sys.modules.get(type(model).__module__)
    replaced = []
    for name, make in _REPLACEMENTS.items():
        current = getattr(module, name, None)
        if module is None or current is None or not callable(current):
            continue
        if not hasattr(current, "semantic_original"):
            patched = make(current)
            patched.semantic_original = current
            setattr(module, name, patched)
            current = patched
        current.options["numpy_exp"] = numpy_exp
        if name == "scaled_dot_product_attention":
            current.options["kernel_attention"] = layer_kernels
        else:
            current.options["kernel"] = layer_kernels
        if numpy_exp and not (name == "swiglu" and layer_kernels and _kernels is not None):
            replaced.append(name)
    return replaced


def uninstall(model: Any) -> None:
    """Give the model's module mlx-lm's functions back (benchmarks compare the two in one process)."""
    module = sys.modules.get(type(model).__module__)
    for name in _REPLACEMENTS:
        current = getattr(module, name, None)
        if current is not None and hasattr(current, "semantic_original"):
            setattr(module, name, current.semantic_original)


# Decode pipelining ---------------------------------------------------------------------------------
#
# A decode step is built by Python (mlx-lm's forward pass, a few microseconds per op) and computed
# by MLX's stream thread. Evaluated once per step, the two take turns: MLX lets a graph's evaluation
# run only ~100 tasks ahead of its stream, so the stream sits idle while Python builds the next
# step (4-6 ms of a ~25 ms SmolLM2 step here). Handing the step to MLX every few layers
# (`mx.async_eval` of a layer's output) lets the stream compute the first layers while Python builds
# the rest. Measured on SmolLM2 decode (2 cores): every layer 1.30x, every 3 layers 1.34x, every 6
# layers 1.18x; prompt chunks (more than one row per sequence) are left alone.


def _pipelined_class(cls: type) -> type:
    def __call__(self: Any, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        out = cls.__call__(self, x, *args, **kwargs)
        if x.ndim == 3 and x.shape[1] == 1 and isinstance(out, mx.array):
            mx.async_eval(out)  # type: ignore[no-untyped-call]
        return out

    return type(f"Pipelined{cls.__name__}", (cls,), {"__call__": __call__, "semantic_pipelined": cls})


_PIPELINED: dict[type, type] = {}


def install_decode_pipelining(model: Any, every: int) -> int:
    """Evaluate a decode step's hidden state asynchronously after every `every` layers (0: off).
    Returns how many layers do it."""
    layers = list(getattr(model, "layers", None) or [])
    n = 0
    for i, layer in enumerate(layers):
        base = getattr(type(layer), "semantic_pipelined", type(layer))
        want = every > 0 and i % every == every - 1
        if want:
            if base not in _PIPELINED:
                _PIPELINED[base] = _pipelined_class(base)
            layer.__class__ = _PIPELINED[base]
            n += 1
        else:
            layer.__class__ = base
    return n
