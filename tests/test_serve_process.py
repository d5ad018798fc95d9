"""`semantic serve` as a real process: graceful shutdown drains, saves, and a restart resumes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.serve_process import free_port, start_serve

ROOT = Path(__file__).resolve().parent.parent


def start(model_dir: Path, cache: Path, port: int) -> subprocess.Popen:
    env = {"SEMANTIC_SERVER_LOG_LEVEL": "PRODUCTION", "SEMANTIC_SERVER_DRAIN_SECONDS": "20"}
    return start_serve(model_dir, cache, port, env=env)


@pytest.mark.slow
def test_sigterm_drains_saves_and_restart_resumes(tiny_model_dir, tmp_path):
    port = free_port()
    proc = start(tiny_model_dir, tmp_path / "cache", port)
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
    first = client.messages.create(
        model="claude-local-test",
        max_tokens=8,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Remember me."}],
        extra_headers={"x-agent-id": "survivor"},
    )
    # A long stream is in flight when SIGTERM arrives: it must finish, not be cut.
    outcome: dict[str, object] = {}

    def long_stream() -> None:
        with client.messages.stream(
            model="claude-local-test",
            max_tokens=400,
            extra_body={"temperature": 0},
            messages=[{"role": "user", "content": "Tell a long story."}],
            extra_headers={"x-agent-id": "in-flight"},
        ) as s:
            outcome["text"] = "".join(s.text_stream)
            outcome["final"] = s.get_final_message()

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert proc.wait(60) == 0
    logs = proc.stdout.read() if proc.stdout else ""
    final = outcome["final"]
    assert final.usage.output_tokens == 400 and final.stop_reason == "max_tokens"  # drained, not cut
    saved = {p.stem for p in (tmp_path / "cache" / "agents").glob("*.safetensors")}
    assert {"survivor", "in-flight"} <= saved
    assert '"request"' in logs or "request" in logs

    proc2 = start(tiny_model_dir, tmp_path / "cache", port)
    try:
        agents = {a["id"]: a for a in httpx.get(f"http://127.0.0.1:{port}/v1/agents").json()["data"]}
        assert agents["survivor"]["tier"] == "cold" and agents["survivor"]["tokens"] > 0
        again = client.messages.create(
            model="claude-local-test",
            max_tokens=4,
            extra_body={"temperature": 0},
            messages=[
                {"role": "user", "content": "Remember me."},
                {"role": "assistant", "content": first.content[0].text},
                {"role": "user", "content": "Still there?"},
            ],
            extra_headers={"x-agent-id": "survivor"},
        )
        assert again.usage.cache_read_input_tokens >= first.usage.input_tokens
    finally:
        proc2.send_signal(signal.SIGINT)
        assert proc2.wait(60) == 0
