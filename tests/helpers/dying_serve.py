"""`semantic serve` whose engine loop dies at its first request: a bug outside every per-request
guard, injected here, so that a test can check the process exits non-zero for its supervisor."""

from __future__ import annotations

import sys

from semantic_core.engine.engine import Engine

_original_schedule = Engine._schedule


def _broken_schedule(self: Engine) -> object:
    if self.scheduler.waiting:
        raise SystemError("injected: a bug in the engine loop")
    return _original_schedule(self)


Engine._schedule = _broken_schedule  # type: ignore[method-assign]

if __name__ == "__main__":
    from semantic_tui.cli import main

    sys.argv = ["semantic", "serve"]
    main()
