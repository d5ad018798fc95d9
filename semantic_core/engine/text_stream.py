"""Turning a sequence's tokens into the text a client sees: streaming detokenization that never
splits a UTF-8 character, and stop sequences matched on text across token boundaries.

A stop string can straddle tokens ("Obs" + "ervation:"), so text is held back while its tail could
still be the start of a stop string, and released once it cannot. The matched stop string and
everything after it are never emitted.
"""

from __future__ import annotations

import copy
from typing import Any


def make_detokenizer_factory(tokenizer: Any) -> Any:
    """A cheap per-request copy of mlx-lm's streaming detokenizer.

    mlx-lm's byte-level BPE detokenizer drops a leading space of the first token (an SPM habit).
    Byte-level BPE has no such convention, and dropping it breaks continuations of a prefilled
    assistant turn ("The answer is" + " Paris"), so this keeps every byte.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    template = tokenizer.detokenizer  # a reset copy; building the token map happened once, at load
    if isinstance(template, BPEStreamingDetokenizer):
        template = copy.copy(template)
        template._maybe_trim_space = lambda text: text  # type: ignore[method-assign]

    def factory() -> Any:
        detok = copy.copy(template)
        detok.reset()
        return detok

    return factory


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add text; return what is safe to emit now. After a match, returns the text before it and
        sets `matched`."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        first: tuple[int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i != -1 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self.matched = first[1]
            self._held = ""
            return buf[: first[0]]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail, when generation ends without a match."""
        out, self._held = self._held, ""
        return out if self.matched is None else ""
