"""Which token ids the KV cache holds, and how much of it a new prompt can keep.

The KV cache holds rows for the ids `ids` (positions 0..len-1). A new prompt keeps the rows of
its longest common prefix with `ids` only where that is exact:

- the prompt extends `ids`: keep all of them, prefill only the new suffix;
- it diverges at L < len(ids) (a re-rendered chat turn whose answer re-tokenizes differently,
  or an answer cut by a stop string): global caches can roll back freely (slots >= position are
  masked), but a sliding ring has overwritten older positions with newer ones, so rolling back
  is exact only while every overwritten slot is one the graph masks anyway (see `_ring_rewinds`);
  GroupQueryAttention's windowed buffers (kv_layout "shared_buffer_windowed") roll back exactly
  while no shift of the window happened in between (`_window_rewinds`).
  Otherwise the sliding buffers saved at the end of the last prompt's prefill (a `mark`, copied
  once per generation) restore the state at that point, if the new prompt shares it;
- else: a full prefill.

The result is always the state a fresh prefill of the same ids would build (up to float
rounding of chunked vs. step-wise computation), never a cache with foreign rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .kv_cache import KVCache

SLIDING_BUFFERS = ("rings", "linear", "windowed")


class PromptCache:
    def __init__(self, cache: KVCache, sliding_window: int | None, sliding: str = "rings"):
        """sliding: how the sliding caches keep their rows: "rings" (slot = position mod length,
        kv_layout "past_and_new_blocks"), "linear" (slot = position, "shared_buffer": they roll
        back like global ones) or "windowed" (the op's compacted window, "shared_buffer_windowed")."""
        if sliding not in SLIDING_BUFFERS:
            raise ValueError(f"sliding buffers {sliding!r} are not one of {SLIDING_BUFFERS}")
        self.cache = cache
        self.window = sliding_window
        self.ids: list[int] = []
        self._windowed = sliding == "windowed"
        self._sliding = [i for i, s in enumerate(cache.specs) if s.kind == "sliding"] if sliding != "linear" else []
        self._mark_len: int | None = None
        self._mark_keys: list[np.ndarray] = []
        self._mark_values: list[np.ndarray] = []

    def invalidate(self) -> None:
        """The cache content is unknown (a failed run, or a caller stepping the model itself)."""
        self.ids = []
        self._mark_len = None

    def plan(self, prompt: Sequence[int]) -> int:
        """How many leading ids of `prompt` can keep their cached rows (at most len - 1: the
        last prompt token must run to produce logits)."""
        n = len(self.ids)
        common = 0
        for a, b in zip(self.ids, prompt):
            if a != b:
                break
            common += 1
        keep = min(common, len(prompt) - 1)
        if keep <= 0:
            return 0
        if keep == n or self._rewinds(n, keep):
            return keep
        if self._mark_len is not None and self._mark_len <= keep:
            return self._mark_len
        return 0

    def prepare(self, prompt: Sequence[int], keep: int) -> None:
        """Put the cache in the state after prompt[:keep] (from plan())."""
        n = len(self.ids)
        if keep == 0:
            self.cache.reset()
            self._mark_len = None
        elif keep < n and not self._rewinds(n, keep):
            assert keep == self._mark_len, "plan() chose this"
            for j, i in enumerate(self._sliding):
                np.copyto(self.cache.keys[i], self._mark_keys[j])
                np.copyto(self.cache.values[i], self._mark_values[j])
        if self._mark_len is not None and self._mark_len > keep:
            self._mark_len = None
        self.ids = list(prompt[:keep])

    def fed(self, ids: Sequence[int]) -> None:
        """These ids' rows were just written, right after the current ones."""
        self.ids.extend(int(i) for i in ids)

    def mark(self) -> None:
        """Remember the rings as they are now (end of a prompt's prefill)."""
        if not self._sliding:
            return
        if not self._mark_keys:
            self._mark_keys = [np.empty_like(self.cache.keys[i]) for i in self._sliding]
            self._mark_values = [np.empty_like(self.cache.values[i]) for i in self._sliding]
        for j, i in enumerate(self._sliding):
            np.copyto(self._mark_keys[j], self.cache.keys[i])
            np.copyto(self._mark_values[j], self.cache.values[i])
        self._mark_len = len(self.ids)

    def _rewinds(self, n: int, keep: int) -> bool:
        return self._window_rewinds(n, keep) if self._windowed else self._ring_rewinds(n, keep)

    def _window_rewinds(self, n: int, keep: int) -> bool:
        """True when every windowed buffer, after n tokens, holds the state after keep tokens:
        its rows start at the same position (no shift in between), so the rows of positions >= keep
        lie past the resident count and are not read."""
        for i in self._sliding:
            capacity = self.cache.specs[i].length
            window = min(self.window or capacity, capacity)
            if n - resident_rows(n, capacity, window) != keep - resident_rows(keep, capacity, window):
                return False
        return True

    def _ring_rewinds(self, n: int, keep: int) -> bool:
        """True when every ring, after holding positions < n, is exact for positions < keep.

        Positions p in [keep, n) overwrote slot p mod S, which held p - S. A query at q >= keep
        sees slots as positions in (q - window, q), and the stale slot reads as p - S; both the
        lost and the stale position are invisible iff p - S < 0 or p - S <= keep - window.
        """
        for i in self._sliding:
            length = self.cache.specs[i].length
            window = min(self.window or length, length)
            worst = n - 1 - length  # the largest p - S
            if worst >= 0 and worst > keep - window:
                return False
        return True


def resident_rows(tokens: int, capacity: int, window: int) -> int:
    """Rows a windowed cache of `capacity` rows holds after `tokens` tokens (onnxruntime's
    GroupQueryAttention contract for sliding_window_cache; gemma_export/model/gqa.py emits it)."""
    if tokens <= capacity:
        return tokens
    reclaim = capacity - window + 1
    return tokens - reclaim * -(-(tokens - capacity) // reclaim)
