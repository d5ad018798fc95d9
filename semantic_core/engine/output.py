"""Turning a sequence's tokens into what its caller sees: text deltas with streaming detokenization
that never splits a UTF-8 character, stop sequences matched on text across token boundaries, and
the final text.

A stop string can straddle tokens ("Obs" + "ervation:"), so text is held back while its tail could
still be the start of a stop string, and released once it cannot. The matched stop string and
everything after it are never emitted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any


def make_detokenizer_factory(tokenizer: Any) -> Callable[[], Any]:
    """A cheap per-request copy of mlx-lm's streaming detokenizer.

    mlx-lm's byte-level BPE detokenizer drops a leading space of the first token (an SPM habit).
    Byte-level BPE has no such convention, and dropping it breaks continuations of a prefilled
    assistant turn ("The answer is" + " Paris"), so this keeps every byte.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    template = tokenizer.detokenizer  # a reset copy; building the token map happened once, at load
    if isinstance(template, BPEStreamingDetokenizer):
        template = copy.copy(template)
        setattr(template, "_maybe_trim_space", lambda text: text)  # noqa: B010 (a method, replaced)

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


class TextOutput:
    """The text of one answer as it is generated: `add(token)` returns the text that is safe to
    show now, `finish()` the rest; `text` is everything shown; `stopped` is the stop string met."""

    def __init__(self, detokenizer: Any, stops: list[str]) -> None:
        self._detok = detokenizer
        self._stops = StopMatcher(stops)
        self._parts: list[str] = []

    @property
    def stopped(self) -> str | None:
        return self._stops.matched

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add(self, token: int) -> str:
        self._detok.add_token(token)
        return self._emit(self._detok.last_segment)

    def finish(self) -> str:
        """The text still held back, when the answer ends for any reason but a stop string."""
        if self._stops.matched is not None:
            return ""
        self._detok.finalize()
        out = self._emit(self._detok.last_segment)
        tail = self._stops.flush()
        if tail:
            self._parts.append(tail)
        return out + tail

    def _emit(self, segment: str) -> str:
        if not segment:
            return ""
        out = self._stops.feed(segment)
        if out:
            self._parts.append(out)
        return out
