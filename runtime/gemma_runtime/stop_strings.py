"""User stop strings over streamed text: stop at the first occurrence, emit only what precedes it.

Text that might be the start of a stop string is held back until the next piece decides, so a
stop string split across tokens is still caught and never half-printed.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidArgumentError


def check_stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidArgumentError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stop


class StopStrings:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.stopped = False
        self._held = ""

    def push(self, piece: str) -> str:
        """Add decoded text; return what may be shown now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = 0  # longest tail of text that a stop string starts with
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The held-back tail once generation has ended without a match."""
        rest, self._held = self._held, ""
        return "" if self.stopped else rest
