"""Streaming detokenization that never emits half a UTF-8 character.

Byte-fallback tokenizers split one character over several tokens; decoding a prefix of
them yields U+FFFD. Each step decodes only a short window of ids (from `_prefix`), not the
whole text, and emits the part past the previous window while the tail is complete.

A run of byte tokens that is not valid UTF-8 (a sampled model can make one) is decoded by
tokenizers as one U+FFFD per byte, also for the bytes before the broken one that the stream
already gave out as characters. Those cannot be taken back: the stream keeps them and decodes on
from the ids not yet given out, so no later text is lost; the joined pieces then differ from a
full decode in that run only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamDecoder:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context (keeps leading spaces right)
        self._read = 0  # ids before this have been emitted
        self._emitted: list[str] = []
        self._diverged = False  # an invalid byte run changed text already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the new complete text ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        before, now = self._window()
        if not now.startswith(before):  # the emitted text decodes differently now: keep it, go on after it
            self._diverged = True
            self._prefix = self._read
            before, now = self._window()
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            piece = now[len(before) :]
            self._emitted.append(piece)
            return piece
        return ""

    def finish(self) -> str:
        """The held-back rest: all pieces joined equal the decode of all ids (unless a broken
        byte run made them differ, see the module doc)."""
        full = self._decode(self._ids)
        done = "".join(self._emitted)
        if not self._diverged and full.startswith(done):
            rest = full[len(done) :]
        else:
            before, now = self._window()
            rest = now[len(before) :] if now.startswith(before) else self._decode(self._ids[self._read :])
        self._emitted.append(rest)
        return rest

    def _window(self) -> tuple[str, str]:
        """The decode of the ids emitted last, and of those plus the ids held back."""
        return self._decode(self._ids[self._prefix : self._read]), self._decode(self._ids[self._prefix :])
