"""Progress for long export steps: a line per step with its duration, and a tqdm bar while
weights load (stderr, so stdout stays clean for scripts)."""

from __future__ import annotations

import contextlib
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = True, total_weights: int | None = None):
        self.enabled = enabled
        self._bar = None
        self._total_weights = total_weights

    def warn(self, message: str) -> None:
        """A warning: printed even with --quiet (what the export could not do as the target asks)."""
        print(f"gemma-export: warning: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, what: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"gemma-export: {what} ...", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        if self.enabled:
            print(f"gemma-export: {what}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def expect_weights(self, count: int) -> None:
        self._total_weights = count

    def tick_weight(self, name: str) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=self._total_weights, unit="tensor", file=sys.stderr, leave=False)
        self._bar.update(1)
