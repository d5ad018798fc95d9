"""Fast quantized matmul and dequantize for MLX's CPU backend.

    import mlx.core as mx
    import semantic_kernels as sk

    y = sk.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4)
    # same result as mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=32, bits=4)

The ops are lazy MLX operations (custom primitives): they compose with other ops, mx.eval,
mx.async_eval and mx.compile, and run on MLX's CPU stream.

Paths (see `paths()`): "scalar", "avx2", "avx512", "neon" compute in float32 from the exact
dequantized weights (error ~1e-7 relative, summation order only); the "*_i8" paths quantize the
activations to int8 per 32 elements and use integer dot products (VNNI / vpmaddubsw / sdot):
2-3x faster at M = 1, ~0.5% relative RMS error on the outputs. The initial default is "auto_float"
(exact: greedy tokens stay identical to MLX's); `set_path("auto_int8")` or a path name opts in.
"""

from __future__ import annotations

import os

import mlx.core as mx


def _check_built_for_this_mlx() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, "_ext.mlx-version")) as f:
            built_for = f.read().strip()
    except OSError:
        raise ImportError("semantic_kernels is not built: run `make setup` (kernels/build.py)") from None
    if built_for != mx.__version__:
        raise ImportError(
            f"semantic_kernels was built for mlx {built_for}, and mlx {mx.__version__} is installed: "
            "rebuild it (`make setup` or kernels/build.py)"
        )


_check_built_for_this_mlx()

from . import _ext  # noqa: E402

__all__ = [
    "attention",
    "available_paths",
    "cpu_features",
    "dequantize",
    "get_num_threads",
    "get_path",
    "paths",
    "quantized_matmul",
    "rms_norm",
    "rope",
    "set_num_threads",
    "set_path",
    "set_spin_us",
    "swiglu",
    "use_path",
]

paths = _ext.paths
set_path = _ext.set_path
get_path = _ext.get_path
set_num_threads = _ext.set_num_threads
get_num_threads = _ext.get_num_threads
set_spin_us = _ext.set_spin_us
get_spin_us = _ext.get_spin_us
set_min_parallel_bytes = _ext.set_min_parallel_bytes
cpu_features = _ext.cpu_features


def resolved_path(path: str | None = None) -> str:
    """The path a call would run now: `path`, or the process default ("auto_float" picks the best
    float path of this CPU, e.g. "avx512")."""
    return str(_ext.resolve_path(path or get_path()))


def available_paths() -> list[str]:
    """Names of the paths this CPU can run, e.g. ['scalar', 'avx2', ..., 'avx512vnni_i8']."""
    return [name for name, _int8, ok in _ext.paths() if ok]


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None = None,
    transpose: bool = True,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    *,
    path: str | None = None,
    stream=None,
) -> mx.array:
    """x @ dequantize(w).T, like mx.quantized_matmul(..., transpose=True) in affine mode.

    x: (..., K) float32/float16/bfloat16; w: (N, K*bits/32) uint32 from mx.quantize; scales and
    biases: (N, K/group_size). Result dtype: promote(x.dtype, scales.dtype), as in MLX.
    path: None = the process default (set_path), else a name from available_paths().
    """
    if mode != "affine" or biases is None:
        raise ValueError("semantic_kernels.quantized_matmul supports affine quantization (with biases) only")
    return _ext.quantized_matmul(x, w, scales, biases, transpose, group_size, bits, path=path, stream=stream)


def dequantize(
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None = None,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    dtype: mx.Dtype | None = None,
    *,
    path: str | None = None,
    stream=None,
) -> mx.array:
    """Like mx.dequantize (affine): (N, K) in `dtype` (default: the scales' dtype)."""
    if mode != "affine" or biases is None:
        raise ValueError("semantic_kernels.dequantize supports affine quantization (with biases) only")
    return _ext.dequantize(w, scales, biases, group_size, bits, dtype, path=path, stream=stream)


def rms_norm(x: mx.array, weight: mx.array, eps: float, *, stream=None) -> mx.array:
    """Like mx.fast.rms_norm(x, weight, eps), as one CPU primitive (MLX's CPU runs ~6 ops)."""
    return _ext.rms_norm(x, weight, eps, stream=stream)


def swiglu(gate: mx.array, up: mx.array, *, stream=None) -> mx.array:
    """silu(gate) * up (mlx-lm's `swiglu`), as one CPU primitive with a vectorised exponential (MLX's
    CPU exp is a scalar loop, ~12 ns an element)."""
    return _ext.swiglu(gate, up, stream=stream)


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool,
    base: float | None,
    scale: float,
    offset: int | mx.array,
    freqs: mx.array | None = None,
    stream=None,
) -> mx.array:
    """Like mx.fast.rope, as one CPU primitive (MLX's CPU runs ~25 ops). `offset`: an int, or an
    int array of one value per batch row (mlx-lm's batch caches)."""
    return _ext.rope(
        x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs, stream=stream
    )


def attention(
    q: mx.array,
    k: mx.array | tuple[mx.array, mx.array, mx.array],
    v: mx.array | tuple[mx.array, mx.array, mx.array],
    *,
    scale: float,
    mask: mx.array | str | None = None,
    group_size: int = 64,
    bits: int | None = None,
    stream=None,
) -> mx.array:
    """softmax(scale * q @ k^T + mask) @ v with grouped-query heads, like
    mx.fast.scaled_dot_product_attention, as one CPU primitive (MLX's CPU runs ~10 ops).

    q: float32 (B, Hq, L, D). k, v: float32 (B, Hkv, S, D), or with `bits` (4 or 8) the
    (codes, scales, biases) triples of mlx-lm's QuantizedKVCache, read without dequantizing.
    mask: None, "causal", a boolean array (True = attend) or an additive float array,
    broadcastable to (B, Hq, L, S). Meant for few query rows (decode): each row reads its head's
    whole K and V.
    """
    mode, arr = ("causal", None) if isinstance(mask, str) else ("", mask)
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"unsupported attention mask {mask!r}")
    if bits is None:
        return _ext.attention(q, k, v, scale=scale, mask_mode=mode, mask=arr, stream=stream)
    return _ext.attention_quantized(
        q, tuple(k), tuple(v), scale=scale, group_size=group_size, bits=bits, mask_mode=mode, mask=arr, stream=stream
    )


class use_path:
    """Context manager: `with sk.use_path("avx2"): ...` builds ops with that default path."""

    def __init__(self, name: str):
        self.name = name
        self.prev: str | None = None

    def __enter__(self):
        self.prev = get_path()
        set_path(self.name)
        return self

    def __exit__(self, *exc):
        set_path(self.prev)
        return False


# Environment overrides, read once at import (useful for A/B runs without code changes).
if os.environ.get("SEMANTIC_KERNELS_PATH"):
    set_path(os.environ["SEMANTIC_KERNELS_PATH"])
if os.environ.get("SEMANTIC_KERNELS_THREADS"):
    set_num_threads(int(os.environ["SEMANTIC_KERNELS_THREADS"]))
