"""The decoder's inputs and outputs bound once to buffers allocated once (onnxruntime IOBinding).

    host                                   onnxruntime session (one, any T)
    embeds [1,T,H]   (filled in place) ─┐
    per_layer [1,T,L,P] (Gemma 3n)     ─┤
    position [1], valid [1]            ─┼─>  decoder  ─┬─> logits [1,V]          (buffer)
    KVCache.keys/values [1,kvh,S,hd]   ─┘              └─> new_key/new_value.N   (buffers
      (bound as they are, no copy; the new rows are          [1,kvh,T,hd])
       written into them between runs)

Every buffer is sized for the largest chunk (the prefill chunk) and allocated when the binding
is made; a chunk of T tokens binds views of their first T rows. One IOBinding per T seen (1 for
decode, the prefill chunk, the last short chunk of a prompt): binding objects are small, the
memory behind them is shared. A decode step then allocates nothing, copies no cache and hands
onnxruntime the same pointers every time.

On a provider whose memory is not the host's (CUDA), onnxruntime copies a host input to the device
when it is bound, not when the graph runs: the inputs are bound again before every run
(`host_inputs_rebound`), so each run copies the host buffers as they are then, caches included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache


@dataclass(frozen=True)
class ChunkIO:
    """The buffers of one chunk length T (views; filled and read in place)."""

    embeds: np.ndarray  # [1, T, H]
    per_layer: np.ndarray | None  # [1, T, L, P]
    position: np.ndarray  # [1] int64
    valid: np.ndarray  # [1] int64
    logits: np.ndarray  # [1, V]
    new_keys: tuple[np.ndarray, ...]  # per cache [1, kvh, T, hd]
    new_values: tuple[np.ndarray, ...]
    binding: ort.IOBinding
    inputs: tuple[tuple[str, np.ndarray], ...]  # what is bound as input, by name


def _prefix(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous view of the first prod(shape) elements of a flat buffer."""
    return flat[: int(np.prod(shape))].reshape(shape)


class DecoderBinding:
    def __init__(self, session: ort.InferenceSession, cache: KVCache, hidden: int, vocab: int,
                 max_chunk: int, per_layer: tuple[int, int] | None = None, in_place: bool = False,
                 fixed_inputs: tuple[tuple[str, np.ndarray], ...] = ()):
        """in_place: the graph's cache outputs are the whole updated buffers (kv_layout
        "shared_buffer"), bound to the cache's own memory; no new-row buffers. fixed_inputs:
        inputs that never change (host-table parts, manifest.table_inputs): bound once, and never
        bound again, also where a device provider copies what is bound."""
        self._fixed = fixed_inputs
        # where the provider's memory is not the host's, a fixed input bound from the host would be
        # copied once per binding (one per chunk length seen): it is copied to the device once here
        device = _DEVICE_MEMORY.get(session.get_providers()[0])
        self._fixed_on_device = None if device is None or not fixed_inputs else [
            (name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)) for name, array in fixed_inputs]
        self._session = session
        self.host_inputs_rebound = session.get_providers()[0] != "CPUExecutionProvider"
        self._cache = cache
        self._in_place = in_place
        self._hidden = hidden
        self._per_layer_dims = per_layer
        self.max_chunk = max_chunk
        self._embeds = np.zeros(max_chunk * hidden, dtype=np.float32)
        self._per_layer = None if per_layer is None else np.zeros(max_chunk * per_layer[0] * per_layer[1], np.float32)
        self._position = np.zeros(1, dtype=np.int64)
        self._valid = np.zeros(1, dtype=np.int64)
        self._logits = np.zeros((1, vocab), dtype=np.float32)
        self._new = [] if in_place else [
            (np.zeros(max_chunk * s.kv_heads * s.head_dim, np.float32),
             np.zeros(max_chunk * s.kv_heads * s.head_dim, np.float32))
            for s in cache.specs
        ]
        self._chunks: dict[int, ChunkIO] = {}

    def chunk(self, t: int) -> ChunkIO:
        """The buffers and binding for T = t (made on first use)."""
        io = self._chunks.get(t)
        if io is None:
            if not 1 <= t <= self.max_chunk:
                raise ValueError(f"chunk length {t} is outside 1..{self.max_chunk}")
            io = self._chunks[t] = self._bind(t)
        return io

    def _bind(self, t: int) -> ChunkIO:
        binding = self._session.io_binding()
        embeds = _prefix(self._embeds, (1, t, self._hidden))
        inputs = [("inputs_embeds", embeds)]
        per_layer = None
        if self._per_layer is not None:
            per_layer = _prefix(self._per_layer, (1, t, *self._per_layer_dims))
            inputs.append(("per_layer_inputs", per_layer))
        inputs += [("position", self._position), ("valid", self._valid)]
        for spec, key, value in zip(self._cache.specs, self._cache.keys, self._cache.values):
            inputs += [(spec.past_key, key), (spec.past_value, value)]
        for name, array in (*inputs, *(self._fixed if self._fixed_on_device is None else ())):
            binding.bind_cpu_input(name, array)
        for name, value in self._fixed_on_device or ():
            binding.bind_ortvalue_input(name, value)
        _bind_output(binding, "logits", self._logits)
        new_keys, new_values = [], []
        for spec, key, value in zip(self._cache.specs, self._cache.keys, self._cache.values):
            if self._in_place:  # present = past: onnxruntime's GroupQueryAttention writes in place
                _bind_output(binding, spec.new_key, key)
                _bind_output(binding, spec.new_value, value)
                for reader_key, reader_value in spec.readers:  # KV-shared layers write here too
                    _bind_output(binding, reader_key, key)
                    _bind_output(binding, reader_value, value)
        for spec, (new_key, new_value) in zip(self._cache.specs, self._new):
            shape = (1, spec.kv_heads, t, spec.head_dim)
            new_keys.append(_prefix(new_key, shape))
            new_values.append(_prefix(new_value, shape))
            _bind_output(binding, spec.new_key, new_keys[-1])
            _bind_output(binding, spec.new_value, new_values[-1])
        return ChunkIO(embeds, per_layer, self._position, self._valid, self._logits,
                       tuple(new_keys), tuple(new_values), binding, tuple(inputs))

    def run(self, io: ChunkIO) -> None:
        if self.host_inputs_rebound:
            for name, array in io.inputs:
                io.binding.bind_cpu_input(name, array)
        self._session.run_with_iobinding(io.binding)


# providers whose tensors live in device memory (onnxruntime's OrtValue device names)
_DEVICE_MEMORY = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def _bind_output(binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
    # onnxruntime writes the output into this memory; the array must outlive the binding
    # (DecoderBinding holds the flat buffers for its own lifetime).
    assert array.flags.c_contiguous and array.dtype == np.float32
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
