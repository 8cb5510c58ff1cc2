"""The KV cache, owned by the runtime: the graph reads the past buffers and returns new rows.

One preallocated float32 buffer pair per CacheSpec, [1, kv_heads, length, head_dim]. The
buffers are handed to onnxruntime as they are (contiguous float32 numpy arrays are wrapped,
not copied; decoder_binding.py binds them once), and the graph's new rows are written here
after each run, in place: the buffers are never replaced, since a binding points at them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ContextLengthError
from .manifest import CacheSpec, ManifestError

KINDS = ("global", "sliding")


class KVCache:
    def __init__(self, specs: Sequence[CacheSpec]):
        for spec in specs:
            if spec.kind not in KINDS:
                raise ManifestError(f"cache of layer {spec.layer}: unknown kind {spec.kind!r} (known: {KINDS})")
            if min(spec.length, spec.kv_heads, spec.head_dim) <= 0:
                raise ManifestError(f"cache of layer {spec.layer}: sizes must be positive, got {spec}")
        self.specs = tuple(specs)
        shapes = [(1, s.kv_heads, s.length, s.head_dim) for s in self.specs]
        self.keys = tuple(np.zeros(shape, dtype=np.float32) for shape in shapes)
        self.values = tuple(np.zeros(shape, dtype=np.float32) for shape in shapes)

    def reset(self) -> None:
        # Stale rows are masked by position in the graph, but zeros keep runs reproducible.
        for buf in (*self.keys, *self.values):
            buf.fill(0.0)

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs: past_key/past_value name -> the live buffer (no copy)."""
        out: dict[str, np.ndarray] = {}
        for spec, key, value in zip(self.specs, self.keys, self.values):
            out[spec.past_key] = key
            out[spec.past_value] = value
        return out

    def output_names(self) -> list[str]:
        return [name for spec in self.specs for name in (spec.new_key, spec.new_value)]

    def store_outputs(self, outputs, position: int, valid: int, whole_buffers: bool = False) -> None:
        """The graph's cache outputs, [new_key, new_value] per spec in order: the chunk's rows
        (stored with write), or with whole_buffers (kv_layout "shared_buffer", outputs not bound
        to these buffers) the updated buffers themselves, copied in."""
        for index in range(len(self.specs)):
            key, value = outputs[2 * index], outputs[2 * index + 1]
            if whole_buffers:
                np.copyto(self.keys[index], key)
                np.copyto(self.values[index], value)
            else:
                self.write(index, key, value, position, valid)

    def write(self, index: int, new_key: np.ndarray, new_value: np.ndarray, position: int, valid: int) -> None:
        """Store the first `valid` of the chunk's rows, which start at absolute `position`."""
        spec = self.specs[index]
        chunk = new_key.shape[2]
        expected = (1, spec.kv_heads, chunk, spec.head_dim)
        if new_key.shape != expected or new_value.shape != expected:
            raise ValueError(
                f"cache of layer {spec.layer}: new rows have shapes {new_key.shape} / {new_value.shape}, "
                f"expected {expected}"
            )
        if not 0 <= valid <= chunk or position < 0:
            raise ValueError(f"cache of layer {spec.layer}: bad position {position} / valid {valid} for T={chunk}")
        if valid == 0:
            return
        if spec.kind == "global":
            if position + valid > spec.length:
                raise ContextLengthError(
                    f"positions {position}..{position + valid - 1} do not fit the global cache of "
                    f"layer {spec.layer} ({spec.length} positions)"
                )
            self.keys[index][:, :, position : position + valid] = new_key[:, :, :valid]
            self.values[index][:, :, position : position + valid] = new_value[:, :, :valid]
            return
        # Ring: only the last `length` valid rows survive; writing earlier ones would be
        # overwritten anyway (and the graph already used them inside the chunk).
        n = min(valid, spec.length)
        slot = (position + valid - n) % spec.length
        head = min(n, spec.length - slot)  # rows up to the ring's end, the rest wrap to slot 0
        for buf, new in ((self.keys[index], new_key), (self.values[index], new_value)):
            buf[:, :, slot : slot + head] = new[:, :, valid - n : valid - n + head]
            if head < n:
                buf[:, :, : n - head] = new[:, :, valid - n + head : valid]
