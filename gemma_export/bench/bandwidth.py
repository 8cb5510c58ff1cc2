"""The machine's read bandwidth, and the decode speed it allows: a decode step must read every
weight it multiplies by plus the KV rows it attends to, so tokens/s <= bandwidth / bytes per token.
Measurement in `measure_read_bandwidth`; the rest is arithmetic (pure functions)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class KvLayer:
    """One layer's own KV cache: `window` rows at most (sliding), or None (global)."""

    kv_heads: int
    head_dim: int
    window: int | None


def last_level_cache_bytes() -> int | None:
    """The largest CPU cache Linux reports for cpu0 (sysfs), or None where it says nothing."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


def buffer_bytes(cache_bytes: int | None) -> int:
    """1 GiB, or 4x the last-level cache where that is larger (some servers' L3 holds hundreds of MiB)."""
    return max(1 << 30, 4 * (cache_bytes or 0))


def measure_read_bandwidth(threads: int, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s: `threads` threads each sum their slice of one buffer much larger than any cache
    (numpy releases the GIL inside the reduction); the best of `repeats` passes (others' load on
    a shared machine only slows a pass)."""
    if threads < 1 or size_bytes < threads * 8:
        raise ValueError(f"threads must be >= 1 and the buffer hold 8 bytes per thread, got {threads}, {size_bytes}")
    buf = np.ones(size_bytes // 8, dtype=np.int64)  # written once: every page is resident
    slices = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            sums = list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    if sum(int(s) for s in sums) != buf.size:
        raise RuntimeError("bandwidth buffer summed wrong")
    return buf.nbytes / best


def kv_bytes_per_step(layers: list[KvLayer], context: int, element_bytes: int) -> int:
    """KV bytes one decode step reads when its token attends to `context` positions (itself
    included): keys and values of every layer that owns a cache, a sliding layer at most its window."""
    rows = (min(context, l.window) if l.window else context for l in layers)
    return sum(2 * r * l.kv_heads * l.head_dim * element_bytes for r, l in zip(rows, layers))


def mean_kv_bytes(layers: list[KvLayer], prompt_tokens: int, new_tokens: int, element_bytes: int) -> float:
    """Mean KV bytes per decode step over a generation: new_tokens - 1 decode steps (the first
    new id comes from the prefill), step i runs position prompt_tokens + i and so attends to
    prompt_tokens + i + 1 positions."""
    steps = range(new_tokens - 1)
    if not steps:
        return 0.0
    return sum(kv_bytes_per_step(layers, prompt_tokens + i + 1, element_bytes) for i in steps) / len(steps)


def bound_tokens_per_second(bandwidth: float, bytes_per_token: float) -> float:
    """The decode speed if every byte a step needs were read once at full bandwidth."""
    return bandwidth / bytes_per_token
