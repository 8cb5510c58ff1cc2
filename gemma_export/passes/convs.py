"""Conv weights as int8, one scale per output channel, dequantized in the graph (QDQ, weight only).

The vision tower (MobileNetV5) keeps almost all of its 294M weights in Conv kernels (its only weight
MatMul is the embedder's projection), and the audio tower has a few (sub-sampling, light conv).
There is no MatMulNBits for a Conv, so each kernel W [C_out, C_in/g, k..] becomes

    W [C_out, ..] float32 ──Conv──>          W_q int8 [C_out, ..] ─┐
                                    ==>       scale [C_out] ────────┴─DequantizeLinear(axis=0)──Conv──>

symmetric (zero point 0), scale = max|W[c]| / 127 per output channel; the activations stay float32.
onnxruntime (CPU) runs the DequantizeLinear on each call (a few hundred ms for the vision tower)
and frees its output after the Conv: the file and the session hold the int8 kernels only. Measured
on the full-size random-weight vision tower (bench/vision_latency.py): folding them at session start
instead (session.disable_quant_qdq=1) costs an fp32 copy in memory; dynamic int8 activations
(onnxruntime's ConvInteger) were 3-4x slower than float32 on CPU and lost more cosine.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .matmuls import TensorReport, _copy
from .store import TensorStore

INT8_MAX = 127


def weight_convs(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Conv weight initializer name -> indices of the Conv nodes that take it as their weight
    (only float initializers used by nothing but Conv weights)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((i, slot))
    outputs = {o.name for o in graph.output}
    found = {}
    for name, places in uses.items():
        t = inits[name]
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 3 or name in outputs:
            continue
        if all(graph.node[i].op_type == "Conv" and slot == 1 for i, slot in places):
            found[name] = [i for i, _ in places]
    return found


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(int8 codes like w, float32 scales [C_out], relative Frobenius error) of symmetric
    round-to-nearest per output channel (axis 0)."""
    flat = w.reshape(w.shape[0], -1).astype(np.float32)
    peak = np.abs(flat).max(axis=1)
    scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    err = float(np.linalg.norm(flat - q * scale[:, None]) / max(np.linalg.norm(flat), 1e-30))
    return q.reshape(w.shape), scale, err


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What DequantizeLinear(axis=0) gives: q * scale[c]."""
    return (q.astype(np.float32) * scale.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)


def quantize_convs(model: onnx.ModelProto, store: TensorStore, report: list[TensorReport] | None = None,
                   tensor_class: str = "conv", progress=None) -> onnx.ModelProto:
    """A new model in which every Conv weight is int8 per output channel behind a
    DequantizeLinear; `model` is not changed, weights go one at a time through `store`."""
    out = _copy(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    convs = weight_convs(out)
    if not convs:
        return out
    replaced: dict[str, list[onnx.TensorProto]] = {}
    before: dict[int, onnx.NodeProto] = {}  # first consumer index -> its DequantizeLinear
    for name, nodes in convs.items():
        w = store.read(inits[name])
        q, scale, err = quantize_per_channel(w)
        tensors = [store.write(f"{name}.int8", q), store.write(f"{name}.scale", scale)]
        replaced[name] = tensors
        dq_out = f"{name}.dequantized"
        before[min(nodes)] = helper.make_node("DequantizeLinear", [t.name for t in tensors], [dq_out],
                                              name=f"/{name}/DequantizeLinear", axis=0)
        for i in nodes:
            graph.node[i].input[1] = dq_out
        if report is not None:
            report.append(TensorReport(name, tensor_class, tuple(int(d) for d in w.shape), "int8/channel/qdq", err))
        if progress is not None:
            progress(name)
        del w, q
    nodes = []
    for i, node in enumerate(graph.node):
        if i in before:
            nodes.append(before[i])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for tensors in replaced.values():
        graph.initializer.extend(tensors)
    return out
