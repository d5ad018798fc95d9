"""One model over two processes: `semantic serve --ranks 2` (mlx-lm pipeline parallelism for qwen2,
the engine in lockstep on both ranks, rank 0 serving HTTP), against one process of the same model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_process import ROOT, free_port, start_serve

MODEL = "qwen2.5-coder-0.5b-instruct"
PROMPT = [{"role": "user", "content": "Write a Python function that returns the sum of a list of numbers."}]


def start(cache: Path, port: int, ranks: int) -> subprocess.Popen[str]:
    args = ("--ranks", str(ranks)) if ranks > 1 else ()
    return start_serve(MODEL, cache, port, args=args, env={"SEMANTIC_SERVER_LOG_LEVEL": "WARNING"})


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def rss_mb(port: int) -> list[float]:
    """Resident memory of each `semantic serve` process serving (or a rank of) this port."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" not in cmd or str(port).encode() not in cmd or b"semantic_tui.cli" not in cmd:
                continue
            if b"--ranks" in cmd or b"python" not in Path(cmd[0].decode()).name.encode():
                continue  # a launcher (ours, mpirun) holds no model
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return out


def ask(port: int, messages: list[dict[str, str]], agent: str, max_tokens: int = 24) -> tuple[str, dict, float]:
    t0 = time.perf_counter()
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/messages",
        json={"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "messages": messages},
        headers={"x-agent-id": agent},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return body["content"][0]["text"], body["usage"], time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.real_model
def test_two_ranks_answer_as_one_process_with_less_memory_each(tmp_path: Path, qwen_model_dir: Path) -> None:
    # One process.
    port = free_port()
    proc = start(tmp_path / "one", port, ranks=1)
    try:
        one_text, one_usage, one_s = ask(port, PROMPT, "solo", max_tokens=48)
        (one_rss,) = rss_mb(port)
    finally:
        stop(proc)

    # Two ranks: the same greedy answer, each rank holding half of the decoder layers.
    port = free_port()
    proc = start(tmp_path / "two", port, ranks=2)
    try:
        text, usage, two_s = ask(port, PROMPT, "duo", max_tokens=48)
        assert text == one_text
        assert usage["output_tokens"] == one_usage["output_tokens"]
        ranks = rss_mb(port)
        assert len(ranks) == 2, ranks
        # Every rank keeps the embedding, the output head and the runtime; the layers are split.
        assert all(r < 0.92 * one_rss for r in ranks), (ranks, one_rss)
        print(
            f"\n48 tokens: one process {one_s:.2f} s, two ranks {two_s:.2f} s; "
            f"resident MB: one process {one_rss:.0f}, ranks {[round(r) for r in ranks]}"
        )
        # The next turn continues the agent's cache on both ranks.
        history = [*PROMPT, {"role": "assistant", "content": text}, {"role": "user", "content": "Now the product."}]
        second, usage2, _ = ask(port, history, "duo")
        assert usage2["cache_read_input_tokens"] > 0
        # A forced tool call: every rank applies the grammar (rank 0 sends its source, each compiles it).
        forced = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 60,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": [
                    {
                        "name": "get_weather",
                        "description": "The weather in a city.",
                        "input_schema": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                            "required": ["city"],
                        },
                    }
                ],
                "tool_choice": {"type": "tool", "name": "get_weather"},
            },
            timeout=300,
        )
        assert forced.status_code == 200, forced.text
        calls = [b for b in forced.json()["content"] if b["type"] == "tool_use"]
        assert calls and calls[0]["name"] == "get_weather" and isinstance(calls[0]["input"].get("city"), str)
        # A bad request rank 0 refuses changes nothing on the others.
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/messages", json={"model": MODEL, "max_tokens": 0}, timeout=60)
        assert bad.status_code == 400
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/messages",
            json={"model": MODEL, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "Hi"}]},
            timeout=120,
        ) as r:
            events = [line for line in r.iter_lines() if line.startswith("event:")]
        assert events[0] == "event: message_start" and events[-1] == "event: message_stop"
    finally:
        stop(proc)
    assert proc.returncode == 0
    for rank in range(2):
        assert (tmp_path / "two" / f"pp{rank}of2" / "agents" / "duo.safetensors").is_file()

    # A restart resumes the agent from each rank's files: the prompt is read, not recomputed.
    proc = start(tmp_path / "two", port, ranks=2)
    try:
        history += [{"role": "assistant", "content": second}, {"role": "user", "content": "And the mean?"}]
        _, usage3, _ = ask(port, history, "duo")
        assert usage3["cache_read_input_tokens"] >= usage2["cache_read_input_tokens"]
    finally:
        stop(proc)


@pytest.mark.real_model
def test_a_model_mlx_lm_cannot_pipeline_is_refused_by_every_rank(tmp_path: Path, real_model_dir: Path) -> None:
    env = {**os.environ, "SEMANTIC_MLX_MODEL_ID": str(real_model_dir), "SEMANTIC_AGENT_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "semantic_tui.cli", "serve", "--ranks", "2", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1
    said = " ".join(done.stderr.split())  # (the console wraps long lines)
    # The first rank to fail says why (under mpirun the job then ends: the other may be stopped first).
    assert "error (rank " in said and "no pipeline parallelism for llama" in said, said
