"""Choosing the next token from the logits.

Only greedy for now; sampling (temperature, top-k/p, min-p, repetition penalty) will plug
in here as another chooser with the same signature.
"""

from __future__ import annotations

import numpy as np

from .errors import GemmaRuntimeError


def greedy(logits: np.ndarray) -> int:
    """Id of the highest logit in a [V] or [1, V] array (the lowest id on ties)."""
    logits = logits.reshape(-1)
    # argmax of NaNs silently picks id 0: a broken graph must not look like a model's choice.
    if np.isnan(logits).any():
        raise GemmaRuntimeError("the decoder returned NaN logits; the export is broken, re-export it")
    return int(np.argmax(logits))
