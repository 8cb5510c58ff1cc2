"""The decoder graph keeps DESIGN.md's contract in what onnxruntime really runs, per family:

- the KV cache is read in place: in the session's optimized graph (onnxruntime's own rewrite,
  saved with `optimized_model_filepath`), the past key/value inputs, through layout-only ops, feed
  nothing but matrix products: no Concat of past and new rows, no Transpose or Expand copy;
  in a GroupQueryAttention graph (kv_layout "shared_buffer" or "shared_buffer_windowed"), each
  feeds one such node directly, whose present output is the graph output the runtime binds to
  the same buffer, windowed (sliding_window_cache) for the sliding layers of the latter; Gemma 3n's
  KV-shared layers' nodes take their producer's present as past, and their presents are graph
  outputs bound to the producer's buffer (manifest CacheSpec.readers);
- the token table stays on the host and the tied LM head is its own constant: the only
  vocabulary-sized initializer is `lm_head_t` [H, V], with no Transpose of it in the graph.
"""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest

FAMILIES = ("gemma", "gemma3_sw8", "gemma3n")
# ops that only move or view data: a cache tensor through them is still the cache
_LAYOUT = {"Reshape", "Transpose", "Slice", "Gather", "Unsqueeze", "Squeeze", "Expand", "Cast",
           "Identity", "Concat", "Tile", "Split"}


def _optimized(path, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath, load_external_data=False)


def _cache_consumers(model: onnx.ModelProto) -> dict[str, int]:
    """Op types that read a past cache input, directly or through layout-only ops."""
    raw = {i.name for i in model.graph.input if i.name.startswith("past_")}
    assert raw, "the graph has no past cache inputs"
    consumers: dict[str, int] = {}
    for node in model.graph.node:  # topologically sorted
        if any(i in raw for i in node.input):
            consumers[node.op_type] = consumers.get(node.op_type, 0) + 1
            if node.op_type in _LAYOUT:
                raw.update(node.output)
    return consumers


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_read_in_place(family, tiny, tmp_path):
    out = tiny.export(family)
    manifest = json.loads((out / "manifest.json").read_text())
    model = _optimized(out / "decoder.onnx", tmp_path)
    consumers = _cache_consumers(model)
    if manifest["kv_layout"] == "past_and_new_blocks":
        assert set(consumers) <= {"MatMul", "FusedMatMul"}, consumers
        return
    windowed = manifest["kv_layout"] == "shared_buffer_windowed"
    assert windowed == (family != "gemma")  # Gemma has no sliding layers
    # sliding_window_cache exists from onnxruntime 1.29: the runtime refuses older ones by this
    needs = tuple(int(x) for x in manifest["provenance"]["min_onnxruntime"].split("."))
    assert (needs >= (1, 29)) == windowed, needs
    assert consumers == {"GroupQueryAttention": len(manifest["caches"])}, consumers
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    readers = {pair[0]: (spec, pair) for spec in manifest["caches"] for pair in spec.get("readers", [])}
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == len(manifest["caches"]) + len(readers)
    assert bool(readers) == (family == "gemma3n")  # Gemma 3n's KV-shared layers read in place too
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.output[1] in readers:
            # a KV-shared layer: its past is its producer's present, its present a graph output
            # that the runtime binds to the same buffer; the producer's buffer is linear (a
            # windowed one would be shifted twice)
            spec, pair = readers[node.output[1]]
            assert (node.input[3], node.input[4]) == (spec["new_key"], spec["new_value"])
            assert tuple(node.output[1:3]) == tuple(pair) and set(pair) <= outputs
            assert attrs.get("sliding_window_cache", 0) == 0 and spec["length"] == manifest["max_context"]
            continue
        past_key, past_value = node.input[3], node.input[4]
        spec = next(c for c in manifest["caches"] if c["past_key"] == past_key)
        assert (past_value, node.output[1], node.output[2]) == (spec["past_value"], spec["new_key"], spec["new_value"])
        # sliding layers keep the op's windowed buffer (a little more than the window), global ones
        # and the producers of KV-shared layers a linear one
        sliding_windowed = windowed and spec["kind"] == "sliding" and not spec.get("readers")
        assert attrs.get("sliding_window_cache", 0) == int(sliding_windowed)
        assert dims[past_key][2] == spec["length"] == (manifest["sliding_window"] + 1 if sliding_windowed
                                                       else manifest["max_context"])


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_is_the_one_vocabulary_constant(family, tiny):
    out = tiny.export(family)
    manifest = json.loads((out / "manifest.json").read_text())
    vocab = manifest["vocab_size"]
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    by_vocab = [(t.name, list(t.dims)) for t in graph.initializer if vocab in t.dims]
    assert len(by_vocab) == 1 and by_vocab[0][0].endswith("lm_head_t"), by_vocab
    hidden = manifest["hidden_size"]
    assert by_vocab[0][1] == [hidden, vocab]
    head = by_vocab[0][0]
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and head in n.input]
