"""Choosing the next token from the last position's logits: greedy or sampled.

`SamplingConfig` holds the settings (frozen, validated). `Sampler` applies them with numpy:
repetition penalty, temperature, top-k, top-p, min-p (Hugging Face's order and semantics),
then draws from a seeded `np.random.Generator`, so a seed reproduces the same tokens.

Memory: one float64 working buffer of vocabulary size, allocated once per Sampler. Per step,
at most one vocabulary-sized temporary is made (the index array of `np.argpartition` for
top-k/top-p, or the boolean mask for min-p without top-k/top-p); everything else is in place
or on the few candidate tokens. (A top-p nucleus wider than the first partition's guess
partitions again with a larger guess; that only happens on very flat distributions.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import GemmaRuntimeError, SamplingError

SAMPLING_ARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_TOP_P_FIRST_GUESS = 64  # candidates partitioned first when top-p runs without top-k


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k 0, top_p 1, min_p 0, repetition_penalty 1 = off;
    seed None = a fresh random seed per call."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, rule):
            raise SamplingError(f"{name} must be {rule}, got {value!r}")

        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "a finite number >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not _number(self.min_p) or not 0 <= self.min_p < 1:
            bad("min_p", self.min_p, "in [0, 1) (0 = off)")
        r = self.repetition_penalty
        if not _number(r) or not math.isfinite(r) or r <= 0:
            bad("repetition_penalty", r, "a finite number > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            bad("seed", self.seed, "an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: argmax of the raw logits."""
        return self.greedy and self.repetition_penalty == 1

    def override(self, **given) -> "SamplingConfig":
        """A copy with the given settings (None = keep); unknown names are an error."""
        unknown = sorted(set(given) - set(SAMPLING_ARGS))
        if unknown:
            raise SamplingError(
                f"unknown sampling argument(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_ARGS)}"
            )
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer)) and not math.isnan(x)


def greedy(logits: np.ndarray) -> int:
    """Id of the highest logit in a [V] or [1, V] array (the lowest id on ties)."""
    logits = logits.reshape(-1)
    # argmax of NaNs silently picks id 0: a broken graph must not look like a model's choice.
    if np.isnan(logits).any():
        raise GemmaRuntimeError("the decoder returned NaN logits; the export is broken, re-export it")
    return int(np.argmax(logits))


class Sampler:
    """Chooses tokens under one SamplingConfig for one generation (it owns the RNG)."""

    def __init__(self, config: SamplingConfig, vocab_size: int, history: Iterable[int] = ()):
        self.config = config
        self._work = np.empty(vocab_size, dtype=np.float64)
        self._rng = np.random.default_rng(config.seed)
        self._seen: set[int] = set()
        self._seen_ids = np.empty(0, dtype=np.int64)
        for token in history:
            self.observe(token)

    def observe(self, token: int) -> None:
        """Record a token of the sequence (prompt or generated) for the repetition penalty."""
        if self.config.repetition_penalty != 1 and int(token) not in self._seen:
            self._seen.add(int(token))
            self._seen_ids = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))

    def choose(self, logits: np.ndarray) -> int:
        c, w = self.config, self._work
        np.copyto(w, logits.reshape(-1))
        if math.isnan(w.max()):  # max propagates NaN: no vocabulary-sized mask needed
            raise GemmaRuntimeError("the decoder returned NaN logits; the export is broken, re-export it")
        if c.repetition_penalty != 1 and self._seen_ids.size:
            seen = w[self._seen_ids]
            w[self._seen_ids] = np.where(seen > 0, seen / c.repetition_penalty, seen * c.repetition_penalty)
        if c.greedy:
            return int(np.argmax(w))
        # softmax(w / temperature), in place
        w *= 1.0 / c.temperature
        w -= w.max()
        np.exp(w, out=w)
        w /= w.sum()
        candidates = self._candidates(w)
        if candidates is None:  # the whole vocabulary: inverse CDF, in place
            np.cumsum(w, out=w)
            u = self._rng.random() * w[-1]
            return int(min(np.searchsorted(w, u, side="right"), w.size - 1))
        p = w[candidates]
        cdf = np.cumsum(p)
        u = self._rng.random() * cdf[-1]
        return int(candidates[min(int(np.searchsorted(cdf, u, side="right")), p.size - 1)])

    def _candidates(self, w: np.ndarray) -> np.ndarray | None:
        """Ids that survive top-k, top-p and min-p, most probable first; None = all of them."""
        c, vocab = self.config, w.size
        ids = None
        if 0 < c.top_k < vocab:
            ids = np.argpartition(w, vocab - c.top_k)[vocab - c.top_k:].copy()
        if c.top_p < 1:
            if ids is None:
                guess = min(_TOP_P_FIRST_GUESS, vocab)
                while True:
                    ids = np.argpartition(w, vocab - guess)[vocab - guess:].copy()
                    if guess == vocab or w[ids].sum() >= c.top_p:
                        break  # the nucleus is a prefix of these (the most probable `guess`)
                    guess = min(guess * 8, vocab)
                ids = self._sorted(w, ids)
                keep = _nucleus(w[ids], c.top_p)  # w sums to 1 over the vocabulary
            else:
                ids = self._sorted(w, ids)
                p = w[ids]
                keep = _nucleus(p / p.sum(), c.top_p)  # relative to the top-k survivors
            ids = ids[:keep]
        if c.min_p > 0:
            if ids is None:
                ids = np.flatnonzero(w >= c.min_p * w.max())
            else:
                p = w[ids]
                ids = ids[p >= c.min_p * p.max()]
        if ids is not None:
            ids = self._sorted(w, ids)  # a fixed order, so a seed draws the same token everywhere
        return ids

    @staticmethod
    def _sorted(w: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return ids[np.lexsort((ids, -w[ids]))]  # most probable first, ties by id


def _nucleus(p_desc: np.ndarray, top_p: float) -> int:
    """How many of the descending probabilities form the smallest set with mass >= top_p."""
    before = np.cumsum(p_desc) - p_desc  # mass of the tokens ranked above each one
    return max(1, int(np.count_nonzero(before < top_p)))
