"""One model over two processes, side by side with one process: `semantic serve --ranks 2` (mlx-lm pipeline
parallelism, the engine in lockstep on both ranks) against `semantic serve`, same model (default
Qwen2.5-Coder-0.5B, the PyPI model mlx-lm can pipeline), same machine.

Per setup: prefill tokens/s (a cold ~500-token prompt: prompt tokens / time to first token), decode tokens/s
(128 greedy tokens: tokens after the first / time after the first), and the resident memory of each process
(VmRSS, after the run). The setups alternate (one, ranks over MPI, ranks over ring, one, ...) and the best of
--reps is kept. On a machine with as many cores as ranks a pipeline cannot beat one process for one sequence (its
stages run one after the other); what it buys is memory per process, for models that do not fit one machine.

    .venv/bin/python benchmarks/distributed_pipeline.py            # ~3 minutes on 2 cores
    .venv/bin/python benchmarks/distributed_pipeline.py --quick
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import Report, fmt_x, make_parser, progress, ratio, running_server, tree_rss_mb

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]


def stream(url: str, model: str, prompt: str, max_tokens: int, agent: str) -> dict[str, float]:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": prompt}],
    }
    t0 = time.perf_counter()
    first = None
    usage: dict[str, Any] = {}
    out = 0
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-agent-id": agent}, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["type"] == "message_start":
                usage = event["message"]["usage"]
            elif event["type"] == "content_block_delta" and first is None:
                first = time.perf_counter()
            elif event["type"] == "message_delta":
                out = event["usage"]["output_tokens"]
    end = time.perf_counter()
    assert first is not None
    prompt_tokens = usage["input_tokens"] + usage.get("cache_read_input_tokens", 0)
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_tps": prompt_tokens / (first - t0),
        "decode_tps": (out - 1) / (end - first) if out > 1 else 0.0,
        "output_tokens": out,
    }


def run(setup: str, args: Any, prompt: str) -> dict[str, Any]:
    ranks, backend = {"one process": (1, "any"), "2 ranks, mpi": (2, "mpi"), "2 ranks, ring": (2, "ring")}[setup]
    work = Path(tempfile.mkdtemp(prefix="semantic-bench-pp-"))
    env = {
        "SEMANTIC_MLX_MODEL_ID": args.model,
        "SEMANTIC_SERVER_LOG_LEVEL": "WARNING",
        "SEMANTIC_DISTRIBUTED_BACKEND": backend,
    }
    try:
        with running_server(work / "serve.log", work, env=env, args=["--ranks", str(ranks)]) as (url, proc):
            stream(url, args.model, "Say hi.", 4, "warm-up")
            result = stream(url, args.model, prompt, args.max_tokens, f"bench-{time.monotonic_ns()}")
            result["rss_mb"] = tree_rss_mb(proc.pid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    p = make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompt-words", type=int, default=380)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    if args.quick:
        args.prompt_words, args.max_tokens, args.reps = 100, 32, 1
    setups = ["one process", "2 ranks, ring"]
    if shutil.which("mpirun"):
        setups.insert(1, "2 ranks, mpi")
    prompt = "Summarise this text in one sentence: " + " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_words))
    best: dict[str, dict[str, Any]] = {}
    for rep in range(args.reps):
        for setup in setups:
            progress(f"{setup} (round {rep + 1}/{args.reps})")
            r = run(setup, args, prompt)
            if setup not in best or r["decode_tps"] > best[setup]["decode_tps"]:
                best[setup] = r
    one = best["one process"]
    report = Report(
        "distributed_pipeline",
        f"{args.model} over 2 processes vs one: {one['prompt_tokens']}-token prompt, {args.max_tokens} greedy "
        f"tokens, best of {args.reps}",
        args.quick,
    )
    report.table(
        "Decode, prefill and memory",
        ["setup", "prefill tokens/s", "decode tokens/s", "decode vs one process", "resident MB per process"],
        [
            [
                setup,
                best[setup]["prefill_tps"],
                best[setup]["decode_tps"],
                fmt_x(ratio(best[setup]["decode_tps"], one["decode_tps"])),
                ", ".join(f"{m:.0f}" for m in best[setup]["rss_mb"]),
            ]
            for setup in setups
        ],
    )
    report.results["setups"] = best
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
