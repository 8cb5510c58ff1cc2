"""Runs the static NPU decoder graphs (prefill T, decode 1) over a token sequence on the host: the
KV cache (the runtime's KVCache), host inputs (the runtime's npu_inputs.py, from the spec the
manifest records) and padding, for any `run` callable (an onnxruntime session on the CPU or QNN
provider, or a recorder of calibration feeds). The exporter's loop, built from the Variant; the
runtime's own (gemma_runtime/npu_decoder.py, built from the manifest) is tested against it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from gemma_runtime.kv_cache import KVCache
from gemma_runtime.npu_inputs import host_inputs

from .model.npu_text import npu_inputs_spec
from .package import _caches
from .variants import Variant

Run = Callable[[str, dict[str, np.ndarray]], list[np.ndarray]]  # (graph "prefill"|"decode", feeds) -> outputs


class NpuDriver:
    def __init__(self, variant: Variant, max_context: int, chunk: int, embed: Callable[[np.ndarray], np.ndarray],
                 per_layer: Callable[[np.ndarray], np.ndarray] | None = None):
        self.variant, self.max_context, self.chunk = variant, max_context, chunk
        self.embed, self.per_layer = embed, per_layer
        self.inputs = npu_inputs_spec(variant, max_context)
        self.cache = KVCache(_caches(variant, max_context))

    @classmethod
    def for_export(cls, folder, variant: Variant) -> "NpuDriver":
        """A driver over the host tables of the export `folder` (any export of the same weights:
        its tables hold the same rows), with that export's max context and prefill chunk."""
        from gemma_runtime.manifest import read_manifest
        from gemma_runtime.tables import HostTableReader

        m = read_manifest(folder)
        embed = HostTableReader.open(folder, "embed_tokens", m.tables["embed_tokens"])
        per_layer = None
        if m.per_layer_inputs is not None:
            per_layer = HostTableReader.open(folder, "per_layer", m.tables["per_layer"], row0_from=m.per_layer_inputs.vocab_size)
        return cls(variant, m.max_context, m.prefill_chunk, embed.lookup, per_layer.lookup if per_layer else None)

    def feeds(self, ids: Sequence[int], position: int, chunk: int) -> dict[str, np.ndarray]:
        v, valid = self.variant, len(ids)
        ids = np.asarray(ids, dtype=np.int64)
        embeds = np.zeros((1, chunk, v.hidden_size), dtype=np.float32)
        embeds[0, :valid] = self.embed(ids)
        feeds = {"inputs_embeds": embeds}
        if v.gemma3n:
            rows = np.zeros((1, chunk, v.num_layers, v.gemma3n.per_layer_dim), dtype=np.float32)
            rows[0, :valid] = self.per_layer(ids).reshape(valid, v.num_layers, v.gemma3n.per_layer_dim)
            feeds["per_layer_inputs"] = rows
        feeds.update(host_inputs(self.inputs, position, valid, chunk))
        feeds.update({k: a.copy() for k, a in self.cache.feeds().items()})
        return feeds

    def step(self, run: Run, ids: Sequence[int], position: int) -> np.ndarray:
        """One graph run: `ids` (1 id: decode; up to chunk: prefill) at `position`. Returns logits [1,V]."""
        graph, chunk = ("decode", 1) if len(ids) == 1 else ("prefill", self.chunk)
        if len(ids) > chunk:
            raise ValueError(f"{len(ids)} ids exceed the prefill chunk {chunk}")
        logits, *rows = run(graph, self.feeds(ids, position, chunk))
        self.cache.store_outputs(rows, position, len(ids))
        return logits

    def teacher_forced(self, run: Run, prompt: Sequence[int], continuation: Sequence[int]) -> list[np.ndarray]:
        """Logits after the prompt (prefilled in chunks) and after each id of `continuation` (decoded
        one by one): len(continuation) + 1 rows."""
        self.cache.reset()
        out, position = [], 0
        for first in range(0, len(prompt), self.chunk):
            part = prompt[first:first + self.chunk]
            logits = self.step(run, part, position)
            position += len(part)
        out.append(logits)
        for token in continuation:
            out.append(self.step(run, [token], position))
            position += 1
        return out
