"""Child process for the crash-safety tests: saves agents in a loop through the real save path.

Usage: python -m tests.helpers.save_loop AGENTS_DIR MODE
  MODE "loop": rewrite agents a0..a3 forever, each version's tensors filled with its version number.
  MODE "fsize": with RLIMIT_FSIZE at 256 KB, try to replace agent `big` with a larger file.
"""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path

import numpy as np

from semantic_core.agents import disk
from semantic_core.agents.record import AgentRecord
from semantic_core.model import kv

FINGERPRINT = "test-fingerprint"


def layers_for(version: int, tokens: int, n_layers: int = 6) -> list[kv.LayerState]:
    k = np.full((1, 2, tokens, 64), float(version), dtype=np.float32)
    return [kv.LayerState(kv.PLAIN, {"keys": k, "values": k + 0.5}, {"offset": tokens}) for _ in range(n_layers)]


def save(agents_dir: Path, agent_id: str, version: int, tokens: int) -> None:
    record = AgentRecord(id=agent_id, messages=[{"role": "user", "content": f"version {version}"}])
    disk.write_agent_file(
        disk.agent_path(agents_dir, agent_id),
        record,
        [version % 1000] * tokens,
        layers_for(version, tokens),
        fingerprint=FINGERPRINT,
        model_id="test",
    )


def main() -> None:
    agents_dir, mode = Path(sys.argv[1]), sys.argv[2]
    agents_dir.mkdir(parents=True, exist_ok=True)
    if mode == "loop":
        version = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        print("ready", flush=True)
        while True:
            version += 1
            save(agents_dir, f"a{version % 4}", version, 512 + 64 * (version % 8))
    elif mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        try:
            save(agents_dir, "big", 2, 4096)
        except Exception as exc:  # StorageError expected
            print(f"{type(exc).__name__}: {exc}", flush=True)
            sys.exit(3)
        sys.exit(0)


if __name__ == "__main__":
    main()
