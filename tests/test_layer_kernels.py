"""The CPU layer kernels (RMS norm, RoPE, attention over float and quantized KV caches, 8-bit groups
of 16) against MLX's own ops, and in a real model: the same greedy tokens with and without them
(skipped, saying why, when the kernels are not built: `make setup` builds them)."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

sk = pytest.importorskip("semantic_kernels", reason="the CPU kernels are not built (make setup builds them)")
from semantic_kernels.nn import SKRMSNorm, SKRoPE, patch_layers, serve_quantized, unpatch_layers  # noqa: E402


def max_rel(a: mx.array, b: mx.array) -> float:
    a64, b64 = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return float(np.abs(a64 - b64).max() / (np.abs(b64).max() + 1e-30))


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 896), (3, 64)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_rms_norm(shape, dtype):
    mx.random.seed(1)
    x = mx.random.normal(shape).astype(dtype)
    w = mx.random.normal((shape[-1],))
    y = sk.rms_norm(x, w, 1e-5)
    ref = mx.fast.rms_norm(x, w, 1e-5)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert max_rel(y, ref) < (2e-6 if dtype == mx.float32 else 2e-3)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [64, 32])
@pytest.mark.parametrize("offset", [0, 517, "per-row"])
def test_rope(traditional, dims, offset):
    mx.random.seed(2)
    # (B, L, H, D) transposed to (B, H, L, D), as attention layers hand it over: not contiguous.
    x = mx.random.normal((3, 5, 4, 64)).transpose(0, 2, 1, 3)
    off = mx.array([3, 900, 41]) if offset == "per-row" else offset
    y = sk.rope(x, dims, traditional=traditional, base=100000.0, scale=1.0, offset=off)
    ref = mx.fast.rope(x, dims, traditional=traditional, base=100000.0, scale=1.0, offset=off)
    # cos/sin of angles up to ~900 radians: float32 rounding of the angle, as in MLX's own.
    assert max_rel(y, ref) < 5e-5


def test_rope_freqs_and_scale():
    mx.random.seed(3)
    x = mx.random.normal((1, 2, 6, 64))
    freqs = mx.random.uniform(shape=(32,)) * 10 + 1
    y = sk.rope(x, 64, traditional=False, base=None, scale=0.5, offset=7, freqs=freqs)
    ref = mx.fast.rope(x, 64, traditional=False, base=None, scale=0.5, offset=7, freqs=freqs)
    assert max_rel(y, ref) < 1e-5


MASKS = ["none", "causal", "bool", "additive"]


def make_mask(kind, b, length, span):
    if kind == "none":
        return None
    if kind == "causal":
        return "causal"
    if kind == "bool":
        m = mx.random.uniform(shape=(b, 1, length, span)) > 0.3
        return mx.concatenate([m[..., :-1], mx.ones((b, 1, length, 1), dtype=mx.bool_)], axis=-1)
    return mx.random.normal((b, 1, length, span))


@pytest.mark.parametrize("dims", [(1, 9, 3, 1, 517), (3, 14, 2, 1, 40), (2, 4, 4, 5, 33), (1, 2, 1, 1, 1)])
@pytest.mark.parametrize("mask", MASKS)
def test_attention_float(dims, mask):
    b, hq, hkv, length, span = dims
    mx.random.seed(4)
    q = mx.random.normal((b, hq, length, 64))
    # Cached keys and values are a prefix of a longer buffer, as mlx-lm's caches hand them over.
    k = mx.random.normal((b, hkv, span + 9, 64))[:, :, :span]
    v = mx.random.normal((b, hkv, span + 9, 64))[:, :, :span]
    m = make_mask(mask, b, length, span)
    y = sk.attention(q, k, v, scale=0.125, mask=m)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=m)
    assert y.shape == ref.shape and y.dtype == mx.float32
    assert max_rel(y, ref) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("mask", ["none", "bool"])
def test_attention_quantized_cache(bits, group_size, mask):
    b, hq, hkv, length, span = 2, 6, 2, 1, 300
    mx.random.seed(5)
    q = mx.random.normal((b, hq, length, 64))
    k = mx.random.normal((b, hkv, span, 64))
    v = mx.random.normal((b, hkv, span, 64))
    kq = mx.quantize(k, group_size=group_size, bits=bits)
    vq = mx.quantize(v, group_size=group_size, bits=bits)
    kd = mx.dequantize(*kq, group_size=group_size, bits=bits)
    vd = mx.dequantize(*vq, group_size=group_size, bits=bits)
    m = make_mask(mask, b, length, span)
    y = sk.attention(q, kq, vq, scale=0.125, mask=m, bits=bits, group_size=group_size)
    ref = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=m)
    assert max_rel(y, ref) < 1e-5


def test_swiglu():
    mx.random.seed(8)
    gate = mx.random.normal((2, 5, 1536)) * 6
    up = mx.random.normal((2, 5, 1536))
    assert max_rel(sk.swiglu(gate, up), nn.silu(gate) * up) < 1e-6
    extreme = mx.array([-1000.0, -88.0, 0.0, 88.0, 1000.0])
    assert max_rel(sk.swiglu(extreme, mx.ones_like(extreme)), nn.silu(extreme)) < 1e-6


def test_attention_errors():
    q = mx.zeros((1, 4, 1, 64))
    k = mx.zeros((1, 3, 5, 64))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        sk.attention(q, k, k, scale=1.0)
    with pytest.raises(ValueError, match="unsupported attention mask"):
        sk.attention(q, mx.zeros((1, 2, 5, 64)), mx.zeros((1, 2, 5, 64)), scale=1.0, mask="sliding")


def test_ops_stay_lazy_and_compose():
    """A graph that chains the ops (views between them, as in a layer) evaluates once to the result
    of MLX's ops."""
    mx.random.seed(6)
    x = mx.random.normal((1, 1, 128))
    w = mx.ones((128,))

    def layer(norm, rope, attend):
        h = norm(x, w, 1e-5).reshape(1, 1, 2, 64).transpose(0, 2, 1, 3)
        h = rope(h, 64, traditional=False, base=10000.0, scale=1.0, offset=5)
        return attend(h, h, h, scale=0.125, mask=None)

    ours = layer(sk.rms_norm, sk.rope, sk.attention)
    ref = layer(mx.fast.rms_norm, mx.fast.rope, mx.fast.scaled_dot_product_attention)
    mx.eval(ours, ref)
    assert max_rel(ours, ref) < 1e-5


def test_patch_layers_swaps_only_plain_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(64)
            self.rope = nn.RoPE(64, base=10000.0)
            self.other = nn.LayerNorm(64)

    block = Block()
    assert patch_layers(block) == 2
    assert type(block.norm) is SKRMSNorm and type(block.rope) is SKRoPE and type(block.other) is nn.LayerNorm
    x = mx.random.normal((1, 2, 3, 64))
    assert max_rel(block.rope(block.norm(x), offset=4), nn.RoPE(64, base=10000.0)(nn.RMSNorm(64)(x), offset=4)) < 1e-5
    assert unpatch_layers(block) == 2 and type(block.norm) is nn.RMSNorm


def test_eight_bit_groups_of_sixteen():
    """Groups of 16 (GGUF Q6_K weights): MLX cannot make them, so the reference is the float matmul
    of the weights they stand for."""
    mx.random.seed(7)
    n, k = 40, 96
    codes = mx.random.randint(0, 64, (n, k)).astype(mx.uint8)
    scales = mx.random.uniform(shape=(n, k // 16)) * 0.01
    biases = -32 * scales
    dense = codes.astype(mx.float32).reshape(n, -1, 16) * scales[..., None] + biases[..., None]
    dense = dense.reshape(n, k)
    words = mx.array(np.ascontiguousarray(np.array(codes)).view(np.uint32))
    lin = nn.Linear(k, n, bias=True)
    lin.weight = dense
    x = mx.random.normal((3, k))
    ref = lin(x)
    serve_quantized(lin, words, scales, biases, 16, 8)
    for path in sk.available_paths():  # int8 paths fall back to the float kernels of their ISA
        with sk.use_path(path):
            assert max_rel(lin(x), ref) < 1e-5, path
    y = sk.dequantize(words, scales, biases, 16, 8, dtype=mx.float32)
    assert max_rel(y, dense) < 1e-6  # fused multiply-add vs two roundings
    with pytest.raises(ValueError, match="group_size"):
        sk.quantized_matmul(x, mx.zeros((n, k // 8), dtype=mx.uint32), scales, biases, True, 16, 4)


_CLONES_SCRIPT = """
import json, mlx.core as mx, mlx.nn as nn, semantic_kernels as sk
mx.random.seed(0)
def err(a, b):
    return float(mx.abs(a - b).max() / mx.abs(b).max())
q = mx.random.normal((1, 6, 1, 64)); k = mx.random.normal((1, 2, 40, 64)); v = mx.random.normal((1, 2, 40, 64))
kq, vq = mx.quantize(k, group_size=32, bits=4), mx.quantize(v, group_size=32, bits=4)
kd, vd = mx.dequantize(*kq, group_size=32, bits=4), mx.dequantize(*vq, group_size=32, bits=4)
x = mx.random.normal((2, 3, 4, 64)); w = mx.random.normal((64,)); g = mx.random.normal((5, 100))
print(json.dumps({
    "features": sk.cpu_features(),
    "attention": err(sk.attention(q, k, v, scale=0.125), mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)),
    "quantized": err(sk.attention(q, kq, vq, scale=0.125, bits=4, group_size=32),
                     mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125)),
    "rope": err(sk.rope(x, 64, traditional=False, base=1e4, scale=1.0, offset=9),
                mx.fast.rope(x, 64, traditional=False, base=1e4, scale=1.0, offset=9)),
    "norm": err(sk.rms_norm(x, w, 1e-5), mx.fast.rms_norm(x, w, 1e-5)),
    "swiglu": err(sk.swiglu(g, g), nn.silu(g) * g),
}))
"""


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_the_lower_isa_clones_under_valgrind():
    """The layer kernels' loops are compiled per ISA level and picked by the CPU's features. valgrind
    shows programs a CPU without AVX-512, so on this machine it runs the clones that AVX2-only CPUs
    run (a few seconds)."""
    proc = subprocess.run(
        ["valgrind", "--tool=none", "-q", sys.executable, "-c", _CLONES_SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "avx512=0" in result.pop("features")
    assert all(e < 1e-5 for e in result.values()), result
