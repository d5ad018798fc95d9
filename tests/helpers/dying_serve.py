"""`semantic serve` whose engine loop dies at its first request: a bug outside every per-request
guard, injected here, so that a test can check the process exits non-zero for its supervisor."""

from __future__ import annotations

import sys

from semantic_core.engine.engine import Engine

_original_admit = Engine._admit


def _broken_admit(self: Engine) -> None:
    if self._waiting:
        raise SystemError("injected: a bug in the engine loop")
    _original_admit(self)


Engine._admit = _broken_admit  # type: ignore[method-assign]

if __name__ == "__main__":
    from semantic_tui.cli import main

    sys.argv = ["semantic", "serve"]
    main()
