"""Claude Code (the real CLI from npm, as `make tools` installs it) against a real server on the tool
model: it is asked to write a file, and does, through the Write tool; a second session reuses the
cached prompt prefix of the first (its system prompt and tools)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

CLAUDE = Path(__file__).resolve().parent.parent / ".tools" / "claude-code" / "node_modules" / ".bin" / "claude"
# Fixed paths: the working directory and HOME are part of Claude Code's prompt, and a greedy answer
# of a 0.5B model changes with every character of it (pytest's numbered temp dirs would vary it).
ROOT = Path("/tmp/semantic-claude-code-e2e")
CAP = 128  # the server's output cap, told to Claude Code too (else it reads a capped answer as its own limit)

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def claude(server_url: str, home: Path, cwd: Path, prompt: str) -> tuple[dict, float]:
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": server_url,
        "ANTHROPIC_API_KEY": "sk-local-test-key",
        "ANTHROPIC_MODEL": "qwen2.5-coder-0.5b-instruct",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(CAP),
    }
    args = [str(CLAUDE), "-p", prompt, "--tools", "Write,Read", "--permission-mode", "acceptEdits"]
    args += ["--exclude-dynamic-system-prompt-sections", "--max-turns", "1", "--output-format", "json"]
    start = time.monotonic()
    done = subprocess.run(
        args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False
    )
    seconds = time.monotonic() - start
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(
            f"Claude Code exited {done.returncode}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
        ) from None
    # One model turn (--max-turns 1): the call is made and run, and the session ends there, before a
    # 0.5B model's afterthoughts (it tends to go on calling or rambling to the cap).
    assert done.returncode == 0 or result.get("subtype") == "error_max_turns", result
    return result, seconds


@pytest.mark.skipif(
    not CLAUDE.exists(), reason="Claude Code is not installed: `make tools` installs it with npm (npm is needed)"
)
def test_claude_code_writes_the_file_and_a_second_session_hits_the_cache(server_factory, qwen_loaded, capsys, request):
    # Greedy (the settings' default) rather than Qwen's own sampling defaults: the same every run.
    server = server_factory(loaded=qwen_loaded, server_max_output_tokens=CAP, mlx_model_sampling=False)
    # The paths are fixed, so two suites on one machine take turns here.
    lock = open(f"{ROOT}.lock", "w")  # noqa: SIM115 (held for the whole test)
    fcntl.flock(lock, fcntl.LOCK_EX)
    request.addfinalizer(lock.close)
    shutil.rmtree(ROOT, ignore_errors=True)
    home = ROOT / "home"
    home.mkdir(parents=True)
    report = []
    for name, content in (("hello.txt", "hi"), ("second.txt", "bye")):
        work = ROOT / name.split(".")[0]
        work.mkdir()
        target = work / name
        result, seconds = claude(
            server.url, home, work, f"Call the Write tool with file_path {target} and content {content}"
        )
        assert target.exists(), result.get("result")
        assert target.read_text().strip() == content
        usage = result["usage"]
        prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
        share = usage["cache_read_input_tokens"] / prompt
        report.append((name, seconds, result["num_turns"], prompt, share))
    # The second session's system prompt and tools were cached by the first.
    assert report[1][4] > 0.5, report
    with capsys.disabled():
        print("\nClaude Code sessions (file, seconds, turns, prompt tokens over the turns, cache-read share):")
        for name, seconds, turns, prompt, share in report:
            print(f"  {name}: {seconds:.1f} s, {turns} turns, {prompt} tokens, {share:.0%} read from the cache")
