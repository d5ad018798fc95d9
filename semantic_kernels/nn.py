"""Drop-in use of the kernels in mlx.nn / mlx-lm models.

    from semantic_kernels.nn import patch_model
    n = patch_model(model)            # every eligible QuantizedLinear / QuantizedEmbedding
    ...
    unpatch_model(model)              # back to MLX's own ops

Patching swaps the *class* of each eligible module for a subclass whose __call__ (and
as_linear, for tied embeddings used as lm_head) calls semantic_kernels.quantized_matmul. Parameters,
their names and the module tree are untouched, so saving, loading weights and mlx-lm's caches keep
working. Ineligible layers (other modes, bits or group sizes, GPU arrays) keep MLX's op.

Large inputs (prefill: more than `prefill_rows` rows of x) can use a different strategy:
  "auto"     (default) "kernel" for int8 paths (they beat dense OpenBLAS sgemm 1.5-2.5x even at
             M = 256), "dequant" for float paths (their tiling is L2-bound past M ~ 32);
  "kernel"   the same kernel, tiled over M;
  "dequant"  dequantize the weights to float32 just in time and use the dense BLAS matmul
             (better when MLX's BLAS is fast, e.g. OpenBLAS loaded, and M is large);
  "mlx"      MLX's mx.quantized_matmul.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import _ext, dequantize, quantized_matmul, rms_norm, rope


def path_is_int8(path: str | None) -> bool:
    name = _ext.resolve_path(path or "auto")
    return any(n == name and int8 for n, int8, _ in _ext.paths())


_SUPPORTED_BITS = (4, 8)
_SUPPORTED_GROUPS = (32, 64, 128)


def _eligible(m: nn.Module) -> bool:
    return (
        getattr(m, "mode", "affine") == "affine"
        and m.bits in _SUPPORTED_BITS
        and (m.group_size in _SUPPORTED_GROUPS or (m.group_size == 16 and m.bits == 8))
        and m.get("biases") is not None
        and m["weight"].ndim == 2
    )


def _rows(x: mx.array) -> int:
    r = 1
    for d in x.shape[:-1]:
        r *= d
    return r


def _qmm(m: nn.Module, x: mx.array) -> mx.array:
    opts = m._sk_opts
    if _rows(x) > opts["prefill_rows"]:
        strategy = opts["prefill"]
        if strategy == "auto":
            strategy = "kernel" if path_is_int8(opts["path"]) else "dequant"
        if strategy == "dequant" and x.dtype == mx.float32:
            w = dequantize(m["weight"], m["scales"], m["biases"], m.group_size, m.bits, dtype=mx.float32)
            return x @ w.T
        if strategy == "mlx":
            return mx.quantized_matmul(
                x,
                m["weight"],
                scales=m["scales"],
                biases=m["biases"],
                transpose=True,
                group_size=m.group_size,
                bits=m.bits,
            )
    return quantized_matmul(x, m["weight"], m["scales"], m["biases"], True, m.group_size, m.bits, path=opts["path"])


class SKQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose forward uses semantic_kernels (set by patch_model via __class__)."""

    def __call__(self, x):
        y = _qmm(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class SKQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose as_linear (tied lm_head) uses semantic_kernels."""

    def as_linear(self, x):
        return _qmm(self, x)


def patch_model(
    model: nn.Module,
    path: str | None = None,
    prefill: str = "auto",
    prefill_rows: int = 64,
    embeddings: bool = True,
) -> int:
    """Route the model's quantized matmuls through semantic_kernels; returns how many modules changed.

    path: a kernel path name (see semantic_kernels.available_paths()), or None for the process
    default at the time each op is built (semantic_kernels.set_path).
    """
    if prefill not in ("auto", "kernel", "dequant", "mlx"):
        raise ValueError("prefill must be 'auto', 'kernel', 'dequant' or 'mlx'")
    opts = {"path": path, "prefill": prefill, "prefill_rows": prefill_rows}
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and _eligible(m):
            m.__class__ = SKQuantizedLinear
        elif embeddings and type(m) is nn.QuantizedEmbedding and _eligible(m):
            m.__class__ = SKQuantizedEmbedding
        elif not isinstance(m, (SKQuantizedLinear, SKQuantizedEmbedding)):
            continue
        # object.__setattr__: nn.Module stores dict-valued attributes as children (parameters).
        object.__setattr__(m, "_sk_opts", opts)
        n += 1
    return n


class SKRMSNorm(nn.RMSNorm):
    """nn.RMSNorm as one CPU primitive (set by patch_layers via __class__)."""

    def __call__(self, x):
        return rms_norm(x, self["weight"], self.eps)


class SKRoPE(nn.RoPE):
    """nn.RoPE as one CPU primitive (set by patch_layers via __class__)."""

    def __call__(self, x, offset=0):
        return rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)


_LAYER_CLASSES = {nn.RMSNorm: SKRMSNorm, nn.RoPE: SKRoPE}


def patch_layers(model: nn.Module) -> int:
    """Route the model's nn.RMSNorm and nn.RoPE modules through the kernels' primitives: on MLX's
    CPU backend mx.fast.rms_norm and mx.fast.rope run as graphs of plain ops (about 6 and 25 of
    them), and every op costs a dispatch. Subclasses of those (other norms, scaled RoPE variants)
    keep their own code. Returns how many modules changed."""
    n = 0
    for _, m in model.named_modules():
        new = _LAYER_CLASSES.get(type(m))
        if new is not None:
            m.__class__ = new
            n += 1
    return n


def unpatch_layers(model: nn.Module) -> int:
    n = 0
    for _, m in model.named_modules():
        for base, new in _LAYER_CLASSES.items():
            if type(m) is new:
                m.__class__ = base
                n += 1
    return n


def serve_quantized(
    m: nn.Module, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> None:
    """Make a float nn.Linear a kernel-served quantized layer with the given affine triple (which
    must represent its weights; the kernels accept 8-bit groups of 16, which MLX's own quantized
    layers cannot hold). Its bias, if any, is kept."""
    if type(m) is not nn.Linear:
        raise TypeError(f"expected an nn.Linear, got {type(m).__name__}")
    n, k = m["weight"].shape
    if weight.shape != (n, k * bits // 32) or scales.shape != (n, k // group_size) or biases.shape != scales.shape:
        raise ValueError(f"an affine triple of shapes {weight.shape}, {scales.shape} does not fit a {n}x{k} layer")
    m.__class__ = SKQuantizedLinear
    m["weight"], m["scales"], m["biases"] = weight, scales, biases
    m.group_size, m.bits, m.mode = group_size, bits, "affine"
    object.__setattr__(m, "_sk_opts", {"path": None, "prefill": "auto", "prefill_rows": 64})


def unpatch_model(model: nn.Module) -> int:
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, SKQuantizedLinear):
            m.__class__ = nn.QuantizedLinear
            n += 1
        elif isinstance(m, SKQuantizedEmbedding):
            m.__class__ = nn.QuantizedEmbedding
            n += 1
    return n
