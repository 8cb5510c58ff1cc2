"""Choosing the next token from the last position's logits: greedy or sampled.

`SamplingConfig` holds the settings (frozen, validated). `Sampler` applies them with numpy:
repetition penalty, temperature, top-k, top-p, min-p (Hugging Face's order: each filter sees the
survivors of the one before), then draws from a seeded `np.random.Generator`, so a seed
reproduces the same tokens.

Memory: the vocabulary-sized buffers a configuration needs are made once per Sampler (float64
probabilities; with top-k/top-p a float64 copy to partition in place and a float64 CDF of the
nucleus; with any filter two boolean masks). A step then works in place: the filters become a
threshold (the n-th largest probability; ties at it keep the lowest ids) and a mask, the dropped
tokens get probability 0, and the draw is an inverse CDF over the whole vocabulary in id order.
Temporaries of a step: the few tokens above a bound on the threshold (at most an eighth of the
vocabulary, see `_largest`), and only when tokens tied at the threshold must be left out, their
index array: never more than one vocabulary-sized array (tests/test_runtime_sampling.py measures
it with tracemalloc).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import GemmaRuntimeError, SamplingError

SAMPLING_ARGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_TOP_P_FIRST_GUESS = 64  # most probable tokens partitioned first when looking for the top-p nucleus


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
    # (max propagates NaN: no vocabulary-sized mask needed)
    if math.isnan(logits.max()):
        raise GemmaRuntimeError("the decoder returned NaN logits; the export is broken, re-export it")
    return int(np.argmax(logits))


class Sampler:
    """Chooses tokens under one SamplingConfig for one generation (it owns the RNG)."""

    def __init__(self, config: SamplingConfig, vocab_size: int, history: Iterable[int] = ()):
        self.config = config
        c = config
        self._top_k = c.top_k if 0 < c.top_k < vocab_size else 0
        ranked = not c.greedy and (self._top_k > 0 or c.top_p < 1)
        filtered = ranked or (not c.greedy and c.min_p > 0)
        self._work = np.empty(vocab_size, dtype=np.float64)
        self._scratch = np.empty(vocab_size, dtype=np.float64) if ranked else None
        self._cdf = np.empty(vocab_size, dtype=np.float64) if ranked and c.top_p < 1 else None
        self._keep = np.empty(vocab_size, dtype=np.bool_) if filtered else None
        self._mask = np.empty(vocab_size, dtype=np.bool_) if filtered else None
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
        w = self._prepare(logits)
        if self.config.greedy:
            return int(np.argmax(w))
        np.cumsum(w, out=w)  # inverse CDF in id order, in place
        u = self._rng.random() * w[-1]
        token = int(np.searchsorted(w, u, side="right"))
        if token == w.size:  # u rounded up to the total: the last token with any mass
            token = int(np.searchsorted(w, w[-1], side="left"))
        return token

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The probabilities `choose` draws from (a copy, summing to 1; one-hot when greedy)."""
        w = self._prepare(logits)
        if self.config.greedy:
            out = np.zeros_like(w)
            out[np.argmax(w)] = 1.0
            return out
        return w / w.sum()

    def _prepare(self, logits: np.ndarray) -> np.ndarray:
        """The work buffer holding the penalized logits (greedy) or the filtered, unnormalized
        probabilities (sampling)."""
        c, w = self.config, self._work
        np.copyto(w, logits.reshape(-1))
        if math.isnan(w.max()):  # max propagates NaN: no vocabulary-sized mask needed
            raise GemmaRuntimeError("the decoder returned NaN logits; the export is broken, re-export it")
        if c.repetition_penalty != 1 and self._seen_ids.size:
            seen = w[self._seen_ids]
            w[self._seen_ids] = np.where(seen > 0, seen / c.repetition_penalty, seen * c.repetition_penalty)
        if c.greedy:
            return w
        # softmax(w / temperature), in place
        w *= 1.0 / c.temperature
        w -= w.max()
        np.exp(w, out=w)
        w /= w.sum()
        if self._keep is not None:
            self._filter(w)
        return w

    def _filter(self, w: np.ndarray) -> None:
        """Zero the probability of every token that top-k, top-p or min-p drops."""
        c, keep, mask = self.config, self._keep, self._mask
        # min-p is relative to the most probable survivor, which is the most probable token
        floor = c.min_p * w.max()
        if self._scratch is None:  # min-p alone
            np.greater_equal(w, floor, out=keep)
        else:
            n, threshold = self._rank_cut(w)
            _top_n(w, n, threshold, keep, mask)
            if c.min_p > 0:
                np.greater_equal(w, floor, out=mask)
                np.logical_and(keep, mask, out=keep)
        np.logical_not(keep, out=keep)
        np.copyto(w, 0.0, where=keep)

    def _rank_cut(self, w: np.ndarray) -> tuple[int, float]:
        """(n, t): top-k then top-p keep the n most probable tokens, the n-th with probability t."""
        c, vocab = self.config, w.size
        m = self._top_k or vocab
        if m < vocab:
            region = self._largest(w, m)
            if c.top_p == 1:
                return m, float(region.min())
            mass = c.top_p * region.sum()  # after top-k the nucleus is relative to the survivors

            def largest(g):
                if g < m:
                    region.partition(m - g)
                return region[m - g:]
        else:
            mass, largest = c.top_p, lambda g: self._largest(w, g)  # w sums to 1
        g = min(_TOP_P_FIRST_GUESS, m)
        while True:  # the nucleus is a prefix of the g most probable; a flat distribution needs more
            top = largest(g)
            np.negative(top, out=top)  # sort descending, in place
            top.sort()
            np.negative(top, out=top)
            cdf = np.cumsum(top, out=self._cdf[:g])
            if g == m or cdf[-1] >= mass:
                break
            g = min(g * 8, m)
        # a token stays while the mass ranked above it is below top_p (the smallest such set)
        n = 1 + int(np.searchsorted(cdf[:-1], mass, side="left"))
        return n, float(top[n - 1])

    def _largest(self, w: np.ndarray, g: int) -> np.ndarray:
        """The g largest values of w, in no order, in a writable array of their own."""
        vocab = w.size
        if g * 64 <= vocab:
            # Partitioning the whole vocabulary costs ms per step. The g-th largest of 2g block
            # maxima bounds the g-th largest value from below (g maxima reach it), so usually
            # only a few tokens pass the bound, and they are partitioned instead.
            block = vocab // (2 * g)
            maxima = w[: vocab - vocab % block].reshape(-1, block).max(axis=1)
            bound = np.partition(maxima, maxima.size - g)[maxima.size - g]
            np.greater_equal(w, bound, out=self._mask)
            if np.count_nonzero(self._mask) * 8 <= vocab:  # else (e.g. sorted logits) partition it all
                passed = w[self._mask]
                passed.partition(passed.size - g)
                return passed[passed.size - g:]
        s = self._scratch
        np.copyto(s, w)
        s.partition(vocab - g)
        return s[vocab - g:]


def _top_n(w: np.ndarray, n: int, threshold: float, keep: np.ndarray, ties: np.ndarray) -> None:
    """keep = the n most probable tokens, `threshold` being the n-th probability; of the tokens
    tied at it, the lowest ids (so the set does not depend on how the partition ordered them)."""
    np.greater(w, threshold, out=keep)
    need = n - int(np.count_nonzero(keep))
    np.equal(w, threshold, out=ties)
    if np.count_nonzero(ties) > need:
        ties[np.flatnonzero(ties)[need - 1] + 1:] = False  # the step's one vocabulary-sized temporary
    np.logical_or(keep, ties, out=keep)
