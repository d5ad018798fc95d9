"""`semantic serve` as a real subprocess on a free local port, for tests of the process itself
(signals, exit status, restarts, `--ranks`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(
    model: str | Path, cache: Path, port: int, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`semantic serve --port PORT [args]` in its own session, once it answers /health/ready (its output
    is in the raised error if it exits first)."""
    full_env = {
        **os.environ,
        "SEMANTIC_MLX_MODEL_ID": str(model),
        "SEMANTIC_AGENT_CACHE_DIR": str(cache),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "semantic_tui.cli", "serve", "--port", str(port), *args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read() if proc.stdout else "serve exited")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("serve did not become ready")
