"""semantic_kernels vs MLX's own CPU ops, for every path this CPU supports (skipped, saying why, when
the kernels are not built: `make setup` builds them)."""

import mlx.core as mx
import numpy as np
import pytest

sk = pytest.importorskip("semantic_kernels", reason="the CPU kernels are not built (make setup builds them)")

PATHS = sk.available_paths()
INT8 = {name for name, int8, _ in sk.paths() if int8}


def rel_rms(a, b):
    a = np.array(a.astype(mx.float32), dtype=np.float64)
    b = np.array(b.astype(mx.float32), dtype=np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-30))


def rel_err(y, ref, x, q, s, b, gs, bits):
    """RMS error relative to the natural size of an output, sqrt(mean_mn sum_k (x_mk w_nk)^2).

    (Relative to the RMS of the outputs themselves is noisy when there are only a few outputs
    and they happen to be small through cancellation.)"""
    wd = mx.dequantize(q, s, b, group_size=gs, bits=bits).astype(mx.float32)
    scale = mx.sqrt(mx.mean(mx.square(x.astype(mx.float32)) @ mx.square(wd).T))
    err = mx.sqrt(mx.mean(mx.square(y.astype(mx.float32) - ref.astype(mx.float32))))
    return float(err / scale)


def tol(path):
    # float paths: summation order only; int8 paths: activations quantized per 32 elements
    # (~0.5% relative RMS on random data, theory: max|x| / 127 / sqrt(12) per element).
    return 2e-2 if path in INT8 else 2e-5


def make(N, K, bits, gs, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    w = (mx.random.normal((N, K)) * 0.05).astype(dtype)
    q, s, b = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(q, s, b)
    return q, s, b


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_matches_mlx_all_m(path, bits, gs):
    # K a multiple of the group size but not of any block (3 groups, 5 groups); N odd.
    for K, N in [(gs * 3, 67), (gs * 5, 13), (640, 1)]:
        q, s, b = make(N, K, bits, gs)
        for M in [*list(range(1, 17)), 33, 100]:
            x = mx.random.normal((M, K))
            ref = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=gs, bits=bits)
            y = sk.quantized_matmul(x, q, s, b, transpose=True, group_size=gs, bits=bits, path=path)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            assert rel_err(y, ref, x, q, s, b, gs, bits) < tol(path) / 2, (K, N, M)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sdtype", [mx.float16, mx.bfloat16])
def test_half_scales(path, sdtype):
    # mx.quantize of half weights gives half scales/biases; the kernels read them natively.
    q, s, b = make(100, 576, 4, 32, dtype=sdtype)
    assert s.dtype == sdtype
    x = mx.random.normal((3, 576))
    ref = mx.quantized_matmul(x, q, s, b, group_size=32, bits=4)
    y = sk.quantized_matmul(x, q, s, b, group_size=32, bits=4, path=path)
    assert y.dtype == ref.dtype == mx.float32
    assert rel_rms(y, ref) < tol(path)


@pytest.mark.parametrize("xdtype", [mx.float16, mx.bfloat16])
def test_half_x(xdtype):
    q, s, b = make(50, 256, 4, 64, dtype=xdtype)
    x = mx.random.normal((2, 256)).astype(xdtype)
    ref = mx.quantized_matmul(x, q, s, b, group_size=64, bits=4)
    y = sk.quantized_matmul(x, q, s, b, group_size=64, bits=4, path="auto_float")
    assert y.dtype == ref.dtype == xdtype
    # MLX accumulates in the half type itself; ours in float32, so compare loosely.
    assert rel_rms(y, ref) < 2e-2


def test_batched_and_strided_x():
    q, s, b = make(40, 128, 8, 32)
    x = mx.random.normal((2, 3, 128))
    ref = mx.quantized_matmul(x, q, s, b, group_size=32, bits=8)
    y = sk.quantized_matmul(x, q, s, b, group_size=32, bits=8, path="auto_float")
    assert y.shape == (2, 3, 40)
    assert rel_rms(y, ref) < 1e-5
    xt = mx.random.normal((128, 5)).T  # non-contiguous view
    assert (
        rel_rms(
            sk.quantized_matmul(xt, q, s, b, group_size=32, bits=8, path="auto_float"),
            mx.quantized_matmul(xt, q, s, b, group_size=32, bits=8),
        )
        < 1e-5
    )


@pytest.mark.parametrize("path", PATHS)
def test_lazy_graph_single_eval(path):
    q, s, b = make(96, 192, 4, 32)
    x = mx.random.normal((4, 192))
    w2 = mx.random.normal((96, 10))

    def f(qmm):
        h = qmm(mx.tanh(x) * 2.0, q, s, b, transpose=True, group_size=32, bits=4)
        return mx.softmax(h @ w2 + 1.0, axis=-1).sum(axis=0)

    y = f(lambda *a, **k: sk.quantized_matmul(*a, **k, path=path))
    ref = f(mx.quantized_matmul)
    mx.eval(y, ref)  # one evaluation of the whole graph
    assert rel_rms(y, ref) < (5e-2 if path in INT8 else 1e-5)


def test_compile():
    q, s, b = make(64, 128, 4, 64)

    @mx.compile
    def f(x):
        return mx.maximum(sk.quantized_matmul(x * 0.5, q, s, b, group_size=64, bits=4, path="auto_float"), 0.0) + 1

    for M in (1, 3):
        x = mx.random.normal((M, 128))
        ref = mx.maximum(mx.quantized_matmul(x * 0.5, q, s, b, group_size=64, bits=4), 0.0) + 1
        assert rel_rms(f(x), ref) < 1e-5


def test_compile_shapeless():
    q, s, b = make(64, 128, 4, 64)
    f = mx.compile(
        lambda x: sk.quantized_matmul(x, q, s, b, group_size=64, bits=4, path="auto_float") * 2, shapeless=True
    )
    for M in (1, 5):
        x = mx.random.normal((M, 128))
        assert rel_rms(f(x), mx.quantized_matmul(x, q, s, b, group_size=64, bits=4) * 2) < 1e-5


def test_other_stream_and_async_eval():
    q, s, b = make(64, 128, 4, 32)
    x = mx.random.normal((2, 128))
    st = mx.new_stream(mx.cpu)
    y = sk.quantized_matmul(x, q, s, b, group_size=32, bits=4, path="auto_float", stream=st)
    mx.async_eval(y)
    assert rel_rms(y, mx.quantized_matmul(x, q, s, b, group_size=32, bits=4)) < 1e-5


def test_threads_give_identical_results():
    q, s, b = make(3000, 576, 4, 32)
    x = mx.random.normal((4, 576))
    old = sk.get_num_threads()
    sk.set_min_parallel_bytes(0)  # use the pool even for this small matrix
    try:
        outs = []
        for t in (1, 2, 3):
            sk.set_num_threads(t)
            outs.append(np.array(sk.quantized_matmul(x, q, s, b, group_size=32, bits=4)))
        # Each output row is computed by one thread with the same code: bitwise equal.
        assert all(np.array_equal(outs[0], o) for o in outs[1:])
    finally:
        sk.set_num_threads(old)
        sk.set_min_parallel_bytes(2 * 1024 * 1024)


def test_concurrent_streams_share_the_pool():
    # Two CPU streams run their tasks on two MLX threads at once; the second caller to reach the
    # pool while it is busy runs its rows inline. Results must not depend on who got the pool.
    q, s, b = make(2048, 576, 4, 32)
    xs = [mx.random.normal((2, 576)) for _ in range(8)]
    refs = [mx.quantized_matmul(x, q, s, b, group_size=32, bits=4) for x in xs]
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    old = sk.get_num_threads()
    sk.set_num_threads(2)
    sk.set_min_parallel_bytes(0)
    try:
        for _ in range(5):
            ys = [
                sk.quantized_matmul(x, q, s, b, group_size=32, bits=4, stream=streams[i % 2]) for i, x in enumerate(xs)
            ]
            mx.eval(ys)
            assert all(rel_rms(y, r) < 1e-5 for y, r in zip(ys, refs, strict=False))
    finally:
        sk.set_num_threads(old)
        sk.set_min_parallel_bytes(2 * 1024 * 1024)


def test_set_path_and_errors():
    prev = sk.get_path()
    try:
        for p in PATHS:
            with sk.use_path(p):
                assert sk.get_path() == p
        sk.set_path("auto_float")
        assert sk.get_path() not in INT8
        with pytest.raises(ValueError):
            sk.set_path("no_such_path")
    finally:
        sk.set_path("auto_int8" if prev in INT8 else "auto_float")
    q, s, b = make(8, 64, 4, 32)
    with pytest.raises(ValueError):
        sk.quantized_matmul(mx.zeros((1, 65)), q, s, b, group_size=32, bits=4)
    with pytest.raises(ValueError):
        sk.quantized_matmul(mx.zeros((1, 64)), q, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError):
        sk.quantized_matmul(mx.zeros((1, 64)), q, s, b, transpose=False, group_size=32, bits=4)


@pytest.mark.parametrize("path", [p for p in PATHS if p not in INT8])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdtype", [mx.float32, mx.float16, mx.bfloat16])
def test_dequantize(path, bits, gs, sdtype):
    q, s, b = make(37, gs * 3, bits, gs, dtype=sdtype)
    ref = mx.dequantize(q, s, b, group_size=gs, bits=bits)
    d = sk.dequantize(q, s, b, group_size=gs, bits=bits, path=path)
    assert d.dtype == ref.dtype == sdtype
    assert rel_rms(d, ref) < 1e-6 if sdtype == mx.float32 else rel_rms(d, ref) < 1e-2
    d32 = sk.dequantize(q, s, b, group_size=gs, bits=bits, dtype=mx.float32, path=path)
    ref32 = mx.dequantize(q.astype(mx.uint32), s.astype(mx.float32), b.astype(mx.float32), group_size=gs, bits=bits)
    assert d32.dtype == mx.float32 and rel_rms(d32, ref32) < 1e-6


@pytest.mark.parametrize("prefill", ["auto", "kernel", "dequant", "mlx"])
def test_patch_model(prefill):
    import mlx.nn as nn

    from semantic_kernels.nn import SKQuantizedEmbedding, SKQuantizedLinear, patch_model, unpatch_model

    mx.random.seed(1)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64, bias=False))
    emb = nn.Embedding(64, 128)
    nn.quantize(model, group_size=32, bits=4)
    emb = nn.QuantizedEmbedding.from_embedding(emb, group_size=32, bits=4)
    for M in (1, 100):  # decode-sized and prefill-sized inputs
        x = mx.random.normal((M, 128))
        ref = model(x)
        ref_e = emb.as_linear(x)
        assert patch_model(model, prefill=prefill, prefill_rows=64) == 2
        assert patch_model(emb, prefill=prefill, prefill_rows=64) == 1
        assert isinstance(model.layers[0], SKQuantizedLinear) and isinstance(emb, SKQuantizedEmbedding)
        assert rel_rms(model(x), ref) < 1e-5 and rel_rms(emb.as_linear(x), ref_e) < 1e-5
        assert set(dict(model.parameters())) == {"layers"}  # parameter tree unchanged
        assert unpatch_model(model) == 2 and unpatch_model(emb) == 1
        assert type(model.layers[0]) is nn.QuantizedLinear
