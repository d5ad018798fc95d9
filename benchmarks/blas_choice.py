"""sgemm throughput of MLX float32 matmul on the CPU under each BLAS the project can load.

MLX's Linux CPU wheel resolves `cblas_sgemm` when it is imported, and `semantic_core` loads the chosen
BLAS before that (SEMANTIC_MLX_BLAS=reference|openblas|mkl). So each BLAS is measured in its own
subprocess; rounds alternate between them so that machine noise hits all alike. Reported per shape:
the median round (each round's value is its median call), and for the decode shapes also the worst
round, since a busy neighbour does not hurt every round alike. Each BLAS is measured on the machine
as found, with one core kept busy by another process, and with both cores busy: OpenBLAS starts one
thread per core, and how it copes with a busy neighbour matters as much as its peak.

Shapes are those of the default model (SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49152) in the
layout `nn.Linear` uses (activations @ weight.T):
- prefill:  512 x 576 @ 576 x 1536   (one 512-token prefill chunk through an MLP projection)
- decode:     1 x 576 @ 576 x 1536   (one sequence, one token)
- decode-8:   8 x 576 @ 576 x 1536   (a batch of eight sequences)
- lm-head:    1 x 576 @ 576 x 49152  (logits of one token; tied embeddings)
- lm-head-8:  8 x 576 @ 576 x 49152
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from _common import fmt, fmt_x, make_parser, median, progress, ratio

SHAPES = [  # name, M, K, N
    ("prefill 512x576 @ 576x1536", 512, 576, 1536),
    ("decode 1x576 @ 576x1536", 1, 576, 1536),
    ("decode 8x576 @ 576x1536", 8, 576, 1536),
    ("lm-head 1x576 @ 576x49152", 1, 576, 49152),
    ("lm-head 8x576 @ 576x49152", 8, 576, 49152),
]
BACKENDS = ["reference", "openblas", "mkl"]
# label -> (SEMANTIC_MLX_BLAS value, extra environment). OpenBLAS is also measured with one thread: its
# default pool (one thread per core) is what the engine gets, but on a busy machine its threads
# wait on each other for small matrices.
VARIANTS = {
    "reference": ("reference", {}),
    "openblas": ("openblas", {}),
    "openblas-1t": ("openblas", {"OPENBLAS_NUM_THREADS": "1"}),
    "mkl": ("mkl", {}),
}
_MARK = "@@blas-result "


def mkl_present() -> bool:
    """The same test `semantic_core.model.blas` makes: libmkl_rt from the `mkl` wheel."""
    roots = {os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")}
    return any(glob.glob(os.path.join(root, "libmkl_rt.so*")) for root in roots)


# The worker: one BLAS, every shape --------------------------------------------------------------------


def worker(backend: str, min_seconds: float) -> None:
    import semantic_core  # noqa: F401  (loads the BLAS named by SEMANTIC_MLX_BLAS, before mlx)
    from semantic_core.model.blas import blas_info

    info = blas_info()
    import mlx.core as mx

    out: dict = {"requested": backend, "blas": info.name, "detail": str(info), "shapes": {}}
    if info.name != backend:
        print(_MARK + json.dumps(out), flush=True)
        return
    mx.random.seed(0)
    for name, m, k, n in SHAPES:
        a = mx.random.normal((m, k))
        w = mx.random.normal((n, k))
        mx.eval(a, w)
        wt = w.T

        def once(a: mx.array = a, wt: mx.array = wt) -> None:
            mx.eval(a @ wt)

        for _ in range(2):  # warm up: page in, thread pools started
            once()
        times: list[float] = []
        spent = 0.0
        while spent < min_seconds or len(times) < 3:
            t0 = time.perf_counter()
            once()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
        best = min(times)
        times.sort()
        med = times[len(times) // 2]
        flops = 2.0 * m * k * n
        out["shapes"][name] = {
            "best_seconds": best,
            "median_seconds": med,
            "calls": len(times),
            "gflops_best": flops / best / 1e9,
            "gflops_median": flops / med / 1e9,
        }
    print(_MARK + json.dumps(out), flush=True)


def run_worker(label: str, min_seconds: float) -> dict:
    backend, extra = VARIANTS[label]
    env = dict(os.environ, SEMANTIC_MLX_BLAS=backend, **extra)
    if label == "openblas":
        env.pop("OPENBLAS_NUM_THREADS", None)  # the library's default pool
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--min-seconds", str(min_seconds)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise RuntimeError(f"the {backend} worker failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")


# The driver ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = make_parser(
        "sgemm GFLOP/s of MLX float32 matmul under the reference BLAS, OpenBLAS and MKL (when installed), "
        "each in its own subprocess.",
        epilog=__doc__,
    )
    parser.add_argument("--rounds", type=int, help="rounds alternating the BLAS libraries (default 3; 1 with --quick)")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--min-seconds", type=float, default=0.6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.min_seconds)
        return

    from _common import Report

    report = Report("blas_choice", "BLAS choice: MLX float32 sgemm on CPU", args.quick)
    rounds = args.rounds or (1 if args.quick else 3)
    min_seconds = 0.15 if args.quick else 0.6
    backends = ["reference", "openblas", "openblas-1t"] + (["mkl"] if mkl_present() else [])
    if "mkl" not in backends:
        report.note("MKL: the `mkl` wheel is not installed here, so it was skipped.")

    conditions = ["as found", "one core busy", "both cores busy"]
    per_round: dict[str, dict[str, dict[str, list[float]]]] = {c: {b: {} for b in backends} for c in conditions}
    detail: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for r in range(rounds):
        for condition in conditions:
            with busy_cores({"as found": 0, "one core busy": 1, "both cores busy": 2}[condition]):
                order = backends if r % 2 == 0 else list(reversed(backends))
                for backend in order:
                    if backend in skipped:
                        continue
                    progress(f"round {r + 1}/{rounds}, {condition}: {backend}")
                    res = run_worker(backend, min_seconds)
                    if res["blas"] != VARIANTS[backend][0]:
                        skipped[backend] = res["detail"]
                        continue
                    threads = VARIANTS[backend][1].get("OPENBLAS_NUM_THREADS")
                    detail[backend] = res["detail"] + (f", OPENBLAS_NUM_THREADS={threads}" if threads else "")
                    into = per_round[condition][backend]
                    for name, sh in res["shapes"].items():
                        into.setdefault(name, []).append(sh["gflops_median"])

    # The median round: a busy neighbour does not hurt every round alike, and a best-of would hide it.
    best = {c: {b: {n: median(v) for n, v in per_round[c][b].items()} for b in backends} for c in conditions}
    worst = {c: {b: {n: min(v) for n, v in per_round[c][b].items()} for b in backends} for c in conditions}

    measured = [b for b in backends if b not in skipped]
    for b, why in skipped.items():
        report.note(f"{b}: could not be loaded ({why}); skipped.")
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for condition in conditions:
        got = best[condition]
        columns = ["shape (M x K @ K x N)", *[f"{b} GFLOP/s" for b in measured]]
        columns += [f"{b} / reference" for b in measured if b != "reference"]
        rows = []
        for name, *_ in SHAPES:
            row = [name, *[fmt(got[b].get(name)) for b in measured]]
            if "reference" in measured:
                row += [fmt_x(ratio(got[b][name], got["reference"][name])) for b in measured if b != "reference"]
            rows.append(row)
        what = {
            "as found": "the machine as found (see its load average)",
            "one core busy": "one core kept busy by an extra process",
            "both cores busy": "two extra processes keeping both cores busy",
        }[condition]
        report.table(f"sgemm GFLOP/s, {what}: median call, median of {rounds} round(s)", columns, rows)
        ratios[condition] = {
            b: {name: ratio(got[b][name], got["reference"][name]) for name, *_ in SHAPES}
            for b in measured
            if b != "reference" and "reference" in measured
        }
    rows = []
    for name, *_ in SHAPES:
        rows.append(
            [
                name,
                *[fmt_x(ratio(best[c][b][name], best["as found"][b][name])) for c in conditions[1:] for b in measured],
            ]
        )
    report.table(
        "Busy over as found (1.0x: unaffected; on an idle 2-core machine about 0.5x is a fair share with "
        "one core taken, about 0.33x with both)",
        ["shape", *[f"{b}, {c}" for c in conditions[1:] for b in measured]],
        rows,
    )
    decode = [n for n, *_ in SHAPES if n.startswith("decode")]
    rows = [
        [f"{b}, {c}", *[fmt(worst[c][b].get(n)) for n in decode], *[fmt(best[c][b].get(n)) for n in decode]]
        for c in conditions
        for b in measured
    ]
    report.table(
        f"Decode shapes: worst and median of {rounds} round(s), GFLOP/s",
        [
            "BLAS, condition",
            *[f"worst: {n.split(' ', 1)[1]}" for n in decode],
            *[f"median: {n.split(' ', 1)[1]}" for n in decode],
        ],
        rows,
    )
    report.results.update(
        {
            "rounds": rounds,
            "gflops": {c: {b: best[c][b] for b in measured} for c in conditions},
            "gflops_worst_round": {c: {b: worst[c][b] for b in measured} for c in conditions},
            "gflops_every_round": {c: {b: per_round[c][b] for b in measured} for c in conditions},
            "details": {b: detail.get(b) for b in measured},
            "skipped": skipped,
            "ratios_vs_reference": ratios,
        }
    )
    for b in measured:
        report.note(f"{b}: {detail[b]}")
    report.note(
        "Float32 matmul in nn.Linear layout (x @ W.T). openblas: its default thread pool (one per core), "
        "as the engine runs it; openblas-1t: OPENBLAS_NUM_THREADS=1. 'one core busy': a second process "
        "spins in a Python loop during the measurement, as a busy neighbour (a compiler, a test run, the "
        "HTTP event loop) would; 'both cores busy': two such processes."
    )
    report.finish(args.json)


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` processes spinning for the duration, each pinned to its own core where Linux allows."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    procs = []
    for i in range(count):
        pin = f"import os\nos.sched_setaffinity(0, {{{cores[i % len(cores)]}}})\n" if cores else ""
        procs.append(subprocess.Popen([sys.executable, "-c", pin + "while True: pass"]))
    try:
        if procs:
            time.sleep(0.3)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
