"""GroupQueryAttention graphs (model/gqa.py, kv_layout "shared_buffer"): the torch op's eager meaning
is what onnxruntime's node computes, and the runtime really hands the op its cache buffers.

References: the custom op's torch body (run eagerly) for the node; the runtime's KV cache memory
itself for the in-place writes; the plain session.run loop for the bound one."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import checkpoints
from gemma_export.model.gqa import CUSTOM_TRANSLATION, group_query_attention
from gemma_runtime.prompt_cache import resident_rows
from gemma_runtime import Model
from gemma_runtime.errors import ContextLengthError

HEADS, DIM, LENGTH = 4, 16, 24
CHUNKS = (7, 6, 1, 1, 3, 1)  # prefill in two chunks, then decode-sized and short chunks


class _OneOp(nn.Module):
    def __init__(self, kv_heads: int, window: int, windowed: bool = False):
        super().__init__()
        self.kv_heads, self.window, self.windowed = kv_heads, window, int(windowed)
        positions = torch.arange(LENGTH, dtype=torch.float32)[:, None] / (100.0 ** (torch.arange(DIM // 2) / (DIM // 2)))
        self.register_buffer("cos", positions.cos())
        self.register_buffer("sin", positions.sin())

    def forward(self, q, k, v, past_key, past_value, position):
        last = (position + q.shape[1] - 1).to(torch.int32)
        return group_query_attention(q, k, v, past_key, past_value, last, last.reshape(()) + 1, self.cos, self.sin,
                                     HEADS, self.kv_heads, 0.25, self.window, self.windowed)


# capacity None: a linear buffer of LENGTH rows; else the op's windowed cache of that many rows
# (5: shifted every token, 7: every third; the chunks of 7 and 6 exceed it)
@pytest.mark.parametrize("kv_heads,window,capacity", [(1, -1, None), (2, 5, None), (1, 5, 5), (2, 5, 7)])
def test_onnx_node_computes_the_eager_op(kv_heads, window, capacity, tmp_path):
    module = _OneOp(kv_heads, window, windowed=capacity is not None)
    cache = (1, kv_heads, capacity or LENGTH, DIM)
    args = (torch.zeros(1, 2, HEADS * DIM), torch.zeros(1, 2, kv_heads * DIM), torch.zeros(1, 2, kv_heads * DIM),
            torch.zeros(cache), torch.zeros(cache), torch.zeros(1, dtype=torch.int64))
    chunk = torch.export.Dim("T", min=1, max=LENGTH)
    program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=CUSTOM_TRANSLATION,
                                input_names=["q", "k", "v", "past_key", "past_value", "position"],
                                output_names=["out", "present_key", "present_value"],
                                dynamic_shapes=({1: chunk}, {1: chunk}, {1: chunk}, None, None, None))
    path = tmp_path / "gqa.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [n.op_type for n in program.model_proto.graph.node if n.domain == "com.microsoft"] == ["GroupQueryAttention"]

    rng = np.random.default_rng(0)
    keys, values = np.zeros(cache, np.float32), np.zeros(cache, np.float32)  # onnxruntime's, updated in place
    eager_keys, eager_values = torch.zeros(cache), torch.zeros(cache)
    position = 0
    for t in CHUNKS:
        q = rng.standard_normal((1, t, HEADS * DIM), dtype=np.float32)
        k, v = (rng.standard_normal((1, t, kv_heads * DIM), dtype=np.float32) for _ in range(2))
        binding = session.io_binding()
        for name, array in (("q", q), ("k", k), ("v", v), ("past_key", keys), ("past_value", values),
                            ("position", np.array([position], np.int64))):
            binding.bind_cpu_input(name, array)
        out = np.zeros_like(q)
        for name, array in (("out", out), ("present_key", keys), ("present_value", values)):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding)
        with torch.no_grad():
            want, eager_keys, eager_values = module(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                                                    eager_keys, eager_values, torch.tensor([position]))
        np.testing.assert_allclose(out, want.numpy(), atol=2e-5)
        position += t
        rows = position if capacity is None else resident_rows(position, capacity, window)
        # the op's rows past the resident ones are unspecified; the whole window always stays
        assert min(position, window) <= rows <= min(position, capacity or LENGTH)
        np.testing.assert_allclose(keys[:, :, :rows], eager_keys.numpy()[:, :, :rows], atol=2e-5)
        np.testing.assert_allclose(values[:, :, :rows], eager_values.numpy()[:, :, :rows], atol=2e-6)
    if capacity is None:
        assert np.abs(keys[:, :, position:]).max() == 0.0  # nothing written past the last position


def test_runtime_binds_the_cache_buffers_in_place(tiny):
    model = Model.load(tiny.export("gemma3_sw8"))
    assert model.manifest.kv_layout == "shared_buffer_windowed"
    prompt = checkpoints.prompt_ids()
    tokens = model.generate_ids(prompt, max_new_tokens=6)
    filled = len(prompt) + len(tokens) - 1  # the last new token is never fed
    window = model.manifest.sliding_window
    kinds = {spec.kind: spec.length for spec in model.manifest.caches}
    assert kinds == {"global": model.manifest.max_context, "sliding": window + 1}  # the window + 8 // 8
    for spec, keys in zip(model.manifest.caches, model._cache.keys):
        rows = np.abs(keys[0]).max(axis=(0, 2))  # per row
        held = filled if spec.kind == "global" else resident_rows(filled, spec.length, window)
        assert (rows[:held] > 0).all()
        if spec.kind == "global":  # the windowed rows past the resident ones are the op's scratch
            assert (rows[held:] == 0).all()

    plain = Model.load(tiny.export("gemma3_sw8"), io_binding=False)  # session.run, outputs copied back
    assert plain.generate_ids(prompt, max_new_tokens=6) == tokens
    for spec, bound, copied in zip(model.manifest.caches, model._cache.keys, plain._cache.keys):
        held = filled if spec.kind == "global" else resident_rows(filled, spec.length, window)
        np.testing.assert_allclose(bound[:, :, :held], copied[:, :, :held], atol=1e-6)


def test_a_prompt_at_the_context_limit_is_refused(tiny):
    model = Model.load(tiny.export("gemma"))
    with pytest.raises(ContextLengthError, match="context limit"):
        model.generate_ids([2] * model.manifest.max_context, max_new_tokens=1)


def test_kv_shared_layers_write_their_producers_buffer_in_place(tiny):
    """Gemma 3n: the KV-shared layers' presents are bound to their producers' buffers (manifest
    CacheSpec.readers); the bound loop and the plain session.run loop (presents copied back,
    onnxruntime's own output buffers) give the same tokens and the same cache rows."""
    model = Model.load(tiny.export("gemma3n"))
    readers = {spec.layer: spec.readers for spec in model.manifest.caches if spec.readers}
    owners = {spec.layer for spec in model.manifest.caches}
    shared = [i for i in range(model.manifest.per_layer_inputs.num_layers) if i not in owners]
    assert shared and sorted(int(k.split(".")[-1]) for pairs in readers.values() for k, _ in pairs) == shared
    for spec in model.manifest.caches:
        if spec.readers:  # a producer of KV-shared layers: linear, whatever its kind
            assert spec.length == model.manifest.max_context
    prompt = checkpoints.prompt_ids()
    tokens = model.generate_ids(prompt, max_new_tokens=6)
    filled = len(prompt) + len(tokens) - 1
    plain = Model.load(tiny.export("gemma3n"), io_binding=False)
    assert plain.generate_ids(prompt, max_new_tokens=6) == tokens
    for spec, bound, copied in zip(model.manifest.caches, model._cache.keys, plain._cache.keys):
        if spec.readers:
            assert (np.abs(bound[0, :, :filled]).max(axis=(0, 2)) > 0).all()
            np.testing.assert_allclose(bound[:, :, :filled], copied[:, :, :filled], atol=1e-6)
