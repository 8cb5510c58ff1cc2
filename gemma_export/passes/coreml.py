"""Rewrites of a static float decoder graph into ops onnxruntime's CoreML provider takes (its ML
Program op list: targets/coreml.toml [ops] standard, from onnxruntime's
tools/ci_build/github/apple/coreml_supported_mlprogram_ops.md). Each keeps the arithmetic exact:

    Neg(x)                               -> Mul(x, -1)                (rotary's rotate-half)
    Gather(x, constant index i, axis a)  -> Slice(x, i, i + 1, a)     (Gemma 3n's AltUp streams;
                                            + Squeeze(a) for a scalar index)

The list has no Neg and no Gather (only GatherND); a node it lacks would run on the CPU, between
two CoreML partitions, each step.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper


def coreml_rewrites(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A new model with the rewrites above applied; counts of the nodes rewritten per op."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    added: list[onnx.TensorProto] = []
    counts: Counter = Counter()
    nodes = []

    def constant(name: str, values, dtype) -> str:
        added.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    for node in graph.node:
        stem = node.name or node.output[0]
        if node.op_type == "Neg" and node.domain in ("", "ai.onnx"):
            minus = constant(f"{stem}/minus_one", -1.0, np.float32)
            nodes.append(helper.make_node("Mul", [node.input[0], minus], list(node.output), name=f"{stem}/Mul"))
            counts["Neg"] += 1
            continue
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[1] in consts:
            index = numpy_helper.to_array(consts[node.input[1]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            flat = index.reshape(-1)
            if index.ndim <= 1 and flat.size and (flat >= 0).all() and (np.diff(flat) == 1).all():
                starts = constant(f"{stem}/starts", [int(flat[0])], np.int64)
                ends = constant(f"{stem}/ends", [int(flat[-1]) + 1], np.int64)
                axes = constant(f"{stem}/axes", [axis], np.int64)
                sliced = node.output[0] if index.ndim == 1 else f"{node.output[0]}/sliced"
                nodes.append(helper.make_node("Slice", [node.input[0], starts, ends, axes], [sliced], name=f"{stem}/Slice"))
                if index.ndim == 0:
                    nodes.append(helper.make_node("Squeeze", [sliced, axes], list(node.output), name=f"{stem}/Squeeze"))
                counts["Gather"] += 1
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    return out, dict(counts)
