"""Streaming detokenization that never emits half a UTF-8 character.

Byte-fallback tokenizers split one character over several tokens; decoding a prefix of
them yields U+FFFD. Each step decodes only a short window of ids (from `_prefix`), not the
whole text, and emits the part past the previous window while the tail is complete.
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

    def push(self, token_id: int) -> str:
        """Add one id; return the new complete text ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT) and now.startswith(before):
            self._prefix, self._read = self._read, len(self._ids)
            piece = now[len(before) :]
            self._emitted.append(piece)
            return piece
        return ""

    def finish(self) -> str:
        """The held-back rest, so that all pieces joined equal the decode of all ids."""
        full = self._decode(self._ids)
        done = "".join(self._emitted)
        # Windows and the full decode agree for the decoders we know; if one ever did not,
        # emitting a mismatched tail would garble text, so the streamed text stands.
        rest = full[len(done) :] if full.startswith(done) else ""
        self._emitted.append(rest)
        return rest
