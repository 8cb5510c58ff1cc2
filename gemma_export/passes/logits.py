"""The all-positions variant of the decoder graph, for evaluation under teacher forcing.

The exported decoder returns the logits of the last valid position only: the final hidden state
[1, T, H] goes through a Gather on axis 1 at index valid-1 before the final norm and the LM head.
This pass bypasses that Gather and reshapes the logits to [T, V]:

    hidden [1,T,H] ─Gather(axis 1, valid-1)─> [1,1,H] ─norm─LM head─(softcap)─Reshape [1,V]─> logits
                    ==>
    hidden [1,T,H] ──────────────────────────────────> norm─LM head─(softcap)─Reshape [T,V]─> logits

Everything after the Gather is position-wise (RMS norm over H, MatMul, tanh soft-cap), so row t of
the new logits is what the graph returns when position t is the last valid one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .rescore import ROWS_INPUT, SCALES_INPUT

LOGITS = "logits"


class GraphShapeError(ValueError):
    pass


def all_positions_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose `logits` output is [T, V] (one row per chunk position)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    chain = _back_walk(producers, LOGITS)
    final = next((n for n in chain if n.op_type == "Reshape"), None)
    if final is None:
        raise GraphShapeError("no Reshape makes the decoder's logits: not a graph made by gemma-export")
    from_valid = _depends_on(producers, "valid")
    # of activations: the LM head's rescoring (passes/rescore.py) gathers rows of a weight by
    # indices that depend on `valid` too
    weights = {t.name for t in graph.initializer} | {ROWS_INPUT, SCALES_INPUT}  # rows may be graph inputs
    gather = next((n for n in chain if n.op_type == "Gather" and n.input[0] not in weights and from_valid(n.input[1])), None)
    if gather is None:
        raise GraphShapeError("no Gather of the last valid position found before the logits")
    hidden, picked = gather.input[0], gather.output[0]
    for node in consumers.get(picked, []):
        for i, name in enumerate(node.input):
            if name == picked:
                node.input[i] = hidden
    graph.node.remove(gather)
    del graph.value_info[:]  # shapes after the Gather change; onnxruntime infers them again
    vocab = next(o for o in graph.output if o.name == LOGITS).type.tensor_type.shape.dim[-1].dim_value
    shape_name = "/eval/logits_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, vocab], dtype=np.int64), shape_name))
    old_shape, final.input[1] = final.input[1], shape_name
    if not any(old_shape in n.input for n in graph.node):
        unused = [t for t in graph.initializer if t.name == old_shape]
        for t in unused:
            graph.initializer.remove(t)
    for o in graph.output:
        if o.name == LOGITS:
            dims = o.type.tensor_type.shape.dim
            dims[0].Clear()
            dims[0].dim_param = "T"
    return out


def _back_walk(producers: dict[str, onnx.NodeProto], start: str) -> list[onnx.NodeProto]:
    """Nodes that `start` depends on, nearest first (breadth first)."""
    order, seen, frontier = [], set(), [start]
    while frontier:
        nxt = []
        for name in frontier:
            node = producers.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            order.append(node)
            nxt.extend(node.input)
        frontier = nxt
    return order


def _depends_on(producers: dict[str, onnx.NodeProto], graph_input: str):
    def check(name: str) -> bool:
        return name == graph_input or any(graph_input in n.input for n in _back_walk(producers, name))
    return check
