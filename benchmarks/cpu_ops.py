"""Prompt chunks on CPU with NumPy's exponential (semantic_core/model/cpu_ops.py) against MLX's own functions.

Same process, same model object (the default model, dense float32, OpenBLAS with the engine's prefill
threads), alternating rounds: mlx-lm's attention and SwiGLU as shipped, then with `cpu_ops.install`.
Measured:

- one attention call at the shapes of the default model (9 query heads, 3 KV heads, head dim 64):
  a 43-token turn on a 1K/4K-token history and a 512-token prefill chunk at 2K/4K;
- the model's forward pass, as the engine runs a prompt: a 43-token turn on a cache holding 1K, 2K
  and 4K tokens, and a 2K-token prompt in 512-token chunks (the cache evaluated, like the engine);
- how far the logits move: largest absolute difference over a 300-token prompt, and whether the
  greedy token is the same at every position.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from _common import Report, fmt, fmt_x, make_parser, model_facts, progress, ratio


def main() -> None:
    parser = make_parser("Prompt chunks on CPU: NumPy exponentials vs MLX's own (attention, SwiGLU).", epilog=__doc__)
    parser.add_argument("--rounds", type=int, help="alternating rounds, best kept (default 3; 1 with --quick)")
    args = parser.parse_args()

    import semantic_core  # noqa: F401  (chooses the BLAS before mlx is imported)

    # isort: split
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    from semantic_core.config import load_settings
    from semantic_core.model import cpu_ops
    from semantic_core.model.blas import set_blas_threads
    from semantic_core.model.loader import load

    report = Report("cpu_ops", "Prompt chunks on CPU: NumPy exponentials vs MLX's own", args.quick)
    rounds = args.rounds or (1 if args.quick else 3)
    settings = load_settings()
    loaded = load(settings)
    model, info = loaded.model, loaded.info
    report.results["model"] = model_facts(info)
    if info.device != "cpu":
        report.note(f"device is {info.device}: cpu_ops is for the CPU backend only; nothing to compare")
        report.finish(args.json)
        return
    threads = settings.mlx_blas_prefill_threads or max(1, (os.cpu_count() or 2) - 1)
    set_blas_threads(threads)
    rng = random.Random(0)
    tokens = [rng.randrange(1000, 40000) for _ in range(4200)]
    histories = [1024] if args.quick else [1024, 2048, 4096]
    prefill_len = 512 if args.quick else 2048

    def best(fn: Any, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def fill(n: int) -> list[Any]:
        cache = make_prompt_cache(model)
        for start in range(0, n, 512):
            model(mx.array([tokens[start : min(start + 512, n)]]), cache=cache)
            mx.eval([c.state for c in cache])
        return cache

    caches = {n: fill(n) for n in histories}

    def turn(n: int) -> None:
        cache = caches[n]
        for c in cache:
            c.offset = n  # drop the previous repetition's turn
        model(mx.array([tokens[n : n + 43]]), cache=cache)
        mx.eval([c.state for c in cache])

    attention_shapes = [(43, 1024), (512, 2048)] if args.quick else [(43, 1024), (43, 4096), (512, 2048), (512, 4096)]
    mx.random.seed(0)
    qkv = {}
    for rows, span in attention_shapes:
        qkv[(rows, span)] = (
            mx.random.normal((1, 9, rows, 64)),
            mx.random.normal((1, 3, span, 64)),
            mx.random.normal((1, 3, span, 64)),
        )
        mx.eval(*qkv[(rows, span)])

    timings: dict[str, dict[str, float]] = {"mlx": {}, "numpy": {}}

    def keep(mode: str, key: str, seconds: float) -> None:
        timings[mode][key] = min(timings[mode].get(key, float("inf")), seconds)

    for r in range(rounds):
        for mode in ("mlx", "numpy"):
            progress(f"round {r + 1}/{rounds}: {mode}")
            if mode == "numpy":
                cpu_ops.install(model)
            else:
                cpu_ops.uninstall(model)
            for (rows, span), (q, k, v) in qkv.items():
                if mode == "numpy":
                    fn = lambda q=q, k=k, v=v: mx.eval(cpu_ops.cpu_attention(q, k, v, 0.125, "causal"))  # noqa: E731
                else:
                    fn = lambda q=q, k=k, v=v: mx.eval(  # noqa: E731
                        mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
                    )
                keep(mode, f"attention {rows}x{span}", best(fn, reps=5))
            for n in histories:
                keep(mode, f"turn {n}", best(lambda n=n: turn(n)))
            keep(mode, "prefill", best(lambda: fill(prefill_len), reps=1))
    cpu_ops.install(model)

    rows = []
    for rows_, span in attention_shapes:
        key = f"attention {rows_}x{span}"
        rows.append(
            [
                f"one attention call, {rows_} query rows on {span:,} keys",
                fmt(timings["mlx"][key] * 1e3),
                fmt(timings["numpy"][key] * 1e3),
                fmt_x(ratio(timings["mlx"][key], timings["numpy"][key])),
            ]
        )
    for n in histories:
        key = f"turn {n}"
        rows.append(
            [
                f"43-token turn on a {n:,}-token history (whole model)",
                fmt(timings["mlx"][key] * 1e3),
                fmt(timings["numpy"][key] * 1e3),
                fmt_x(ratio(timings["mlx"][key], timings["numpy"][key])),
            ]
        )
    rows.append(
        [
            f"{prefill_len:,}-token prompt in 512-token chunks (whole model)",
            fmt(timings["mlx"]["prefill"] * 1e3),
            fmt(timings["numpy"]["prefill"] * 1e3),
            fmt_x(ratio(timings["mlx"]["prefill"], timings["numpy"]["prefill"])),
        ]
    )
    report.table(
        f"Milliseconds, best of {rounds} alternating round(s); BLAS threads {threads}",
        ["what", "MLX's functions", "NumPy exponentials", "speed-up"],
        rows,
    )

    # How far the numbers move.
    prompt = mx.array([tokens[:300]])
    cpu_ops.uninstall(model)
    plain = np.array(model(prompt, cache=make_prompt_cache(model))[0])
    cpu_ops.install(model)
    ours = np.array(model(prompt, cache=make_prompt_cache(model))[0])
    drift = float(np.abs(plain - ours).max())
    same = float((plain.argmax(-1) == ours.argmax(-1)).mean())
    report.table(
        "Logits of a 300-token prompt, MLX's functions vs NumPy exponentials",
        ["largest |difference|", "logit range", "same greedy token"],
        [[f"{drift:.2e}", f"{float(plain.min()):.1f} .. {float(plain.max()):.1f}", f"{same:.1%}"]],
    )
    report.results.update(
        {"timings_seconds": timings, "logit_max_abs_diff": drift, "greedy_agreement": same, "blas_threads": threads}
    )
    report.finish(args.json)


if __name__ == "__main__":
    main()
