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
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import free_port, json_safe, machine, make_parser, progress

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards"]


def start(work: Path, port: int, model: str, ranks: int, backend: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SEMANTIC_MLX_MODEL_ID": model,
        "SEMANTIC_AGENT_CACHE_DIR": str(work),
        "SEMANTIC_SERVER_LOG_LEVEL": "WARNING",
        "SEMANTIC_DISTRIBUTED_BACKEND": backend,
    }
    argv = [sys.executable, "-m", "semantic_tui.cli", "serve", "--port", str(port)]
    if ranks > 1:
        argv += ["--ranks", str(ranks)]
    log = open(work / "serve.log", "ab")  # noqa: SIM115 (the process keeps it)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((work / "serve.log").read_text()[-2000:])
        time.sleep(0.3)
    raise RuntimeError("not ready")


def rss_mb(port: int) -> list[float]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"semantic_tui.cli" not in cmd or str(port).encode() not in cmd or b"--ranks" in cmd:
                continue
            if b"python" not in Path(cmd[0].decode()).name.encode():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return sorted(out, reverse=True)


def stream(port: int, model: str, prompt: str, max_tokens: int, agent: str) -> dict[str, float]:
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
    with httpx.stream(
        "POST", f"http://127.0.0.1:{port}/v1/messages", json=body, headers={"x-agent-id": agent}, timeout=600
    ) as r:
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
    port = free_port()
    proc = start(work, port, args.model, ranks, backend)
    try:
        stream(port, args.model, "Say hi.", 4, "warm-up")
        result = stream(port, args.model, prompt, args.max_tokens, f"bench-{time.monotonic_ns()}")
        result["rss_mb"] = rss_mb(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
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
    print(
        f"\n{args.model}, {one['prompt_tokens']}-token prompt, {args.max_tokens} tokens, greedy, best of {args.reps}\n"
    )
    print("| setup | prefill tokens/s | decode tokens/s | decode vs one process | resident MB per process |")
    print("|---|---|---|---|---|")
    for setup in setups:
        r = best[setup]
        print(
            f"| {setup} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {r['decode_tps'] / one['decode_tps']:.2f}x "
            f"| {', '.join(f'{m:.0f}' for m in r['rss_mb'])} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                json_safe(
                    {
                        "machine": machine(),
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "results": best,
                    }
                ),
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
