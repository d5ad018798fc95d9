"""A crash at any moment of a save, or a full disk, leaves every saved agent loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from semantic_core.agents import disk
from tests.helpers.save_loop import FINGERPRINT, layers_for, save

ROOT = Path(__file__).resolve().parent.parent


def start_loop(agents_dir: Path, first_version: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.save_loop", str(agents_dir), "loop", str(first_version)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def check_every_agent(agents_dir: Path) -> int:
    verified = 0
    for path in sorted(agents_dir.glob("*.safetensors")):
        header, layers = disk.read_agent_file(path, FINGERPRINT)  # raises if anything is off
        version = int(header.record.messages[0]["content"].split()[1])
        assert header.tokens == [version % 1000] * len(header.tokens)
        for state in layers:
            k, v = state.arrays["keys"], state.arrays["values"]
            assert np.all(k == float(version)) and np.all(v == float(version) + 0.5)
        verified += 1
    return verified


@pytest.mark.slow
def test_kill_minus_nine_during_saves_never_leaves_a_damaged_agent(tmp_path):
    agents_dir = tmp_path / "agents"
    rng = random.Random(1234)
    version = 0
    interrupted = 0
    # Kill until at least 3 kills have landed inside a save (how many that takes depends on this
    # machine's disk and load: a fixed count of kills failed CI once with 2 of 24), and at least 24.
    run = 0
    while run < 24 or (interrupted < 3 and run < 300):
        proc = start_loop(agents_dir, version)
        time.sleep(rng.uniform(0.02, 0.4))  # somewhere inside a save, most of the time
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        verified = check_every_agent(agents_dir)
        if run > 2:
            assert verified == 4
        # The store removes what a killed save left behind when it starts.
        for tmp in disk.stale_temp_files(agents_dir):
            interrupted += 1
            tmp.unlink()
        version += 10_000
        run += 1
    assert not list(agents_dir.glob(".*.tmp-*"))
    assert interrupted >= 3, f"the kills should land inside saves (a temp file left behind): {run} kills"


def test_full_disk_raises_and_keeps_the_previous_file(tmp_path):
    agents_dir = tmp_path / "agents"
    save(agents_dir, "big", 1, 64)
    before = (agents_dir / "big.safetensors").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.save_loop", str(agents_dir), "fsize"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "StorageError" in proc.stdout and "File too large" in proc.stdout
    assert (agents_dir / "big.safetensors").read_bytes() == before
    header, layers = disk.read_agent_file(agents_dir / "big.safetensors", FINGERPRINT)
    assert len(header.tokens) == 64 and np.all(layers[0].arrays["keys"] == 1.0)
    assert not disk.stale_temp_files(agents_dir)


def test_layers_helper_shapes():
    state = layers_for(3, 10)[0]
    k, v = state.arrays["keys"], state.arrays["values"]
    assert k.shape == (1, 2, 10, 64) and float(v[0, 0, 0, 0]) == 3.5
