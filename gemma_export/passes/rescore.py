"""A 4-bit LM head whose best candidates are scored again from 8-bit rows.

The LM head is the largest weight of a small Gemma (Gemma 3 270M: 262144 x 640, 64% of the
parameters) and the one decode reads most: its 8-bit MatMulNBits took 57% of the int4 recipe's
MatMulNBits time per step. In 4 bits it reads half the bytes, but its own error lands on the
logits (top-1 agreement with fp32 90.8% -> 83.3%, bench/int4_kernels.py). Here the 4-bit head
scores the whole vocabulary, and the K best of its logits are recomputed from an int8 copy of
those K rows (one scale per row), so the tokens that sampling and argmax pick carry int8 logits
while the step reads the 4-bit head plus K rows:

    h [.., D] ──LM head, 4-bit──> approx [.., V] ──TopK(K)──> idx [.., K]
    rows8 [V, D] int8 ──Gather(idx)──> [.., K, D] ──Cast──Mul(h)──ReduceSum──Mul(Gather(scale, idx))──> exact [.., K]
    logits = ScatterElements(approx, idx, exact, axis -1)

Every op is position-wise over the leading axes, so the all-positions graph of `gemma-export eval`
(passes/logits.py) scores the same way. onnxruntime has no op that takes both formats from one
tensor, so the int8 rows are a second copy of the head:
- untied head: an initializer of the graph (V x D bytes more on disk; only the K gathered rows'
  pages are read a step, but the data file's mapping reads ahead around each).
- head tied to the embed_tokens host table of int8 rows (Gemma 3 270M, Gemma 3n): the table's own
  rows, as graph inputs `lm_head_rows` [V, D] int8 and `lm_head_row_scales` [V] that the runtime
  binds to the table's memory map (manifest.table_inputs; mapped without readahead). The table's
  rows carry the embedding multiplier c (sqrt(H)), so the scales are divided by c; rows the table
  holds for something else (Gemma 3n's hard image/audio tokens, from `exact_rows` on) keep the
  4-bit logit:

    ids ──Less(exact_rows)──> Where(exact, values)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..recipes import HostRows
from .store import TensorStore


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of W^T [N, K] (W is the MatMul's [K, N]) as int8 with one float32 scale per row:
    symmetric round-to-nearest, max |row| -> 127."""
    rows = np.ascontiguousarray(w.T)
    scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


# graph inputs of rows read from the host table (manifest.table_inputs names their table parts)
ROWS_INPUT, SCALES_INPUT = "lm_head_rows", "lm_head_row_scales"


@dataclass(frozen=True)
class Rescoring:
    """What the rescoring nodes of one LM head weight read: initializers to add (the constants,
    and the int8 rows unless they come from a host table), the names of the rows and their
    scales, and graph inputs to add (rows from a host table)."""

    tensors: list[onnx.TensorProto]
    stem: str
    rows: str
    scales: str
    host: HostRows | None = None
    inputs: tuple[onnx.ValueInfoProto, ...] = ()

    def nodes(self, h: str, approx: str, out: str) -> list[onnx.NodeProto]:
        """Nodes that make `out` from the approximate logits `approx` of the head's input `h`."""
        c = f"{self.stem}.rescore"  # the constants' names (rescore_nodes)
        p = f"/{self.stem}/rescore/{out.strip('/')}"  # one set of names per head output
        ids, values, scales = f"{p}/ids", f"{p}/values", f"{p}/scales"
        exact = f"{p}/exact"
        dots_scaled = exact if self.host is None else f"{p}/rescored"
        nodes = [
            helper.make_node("TopK", [approx, f"{c}_k"], [values, ids], name=f"{p}/TopK", axis=-1),
            helper.make_node("Gather", [self.rows, ids], [f"{p}/rows_int8"], name=f"{p}/Gather_rows", axis=0),
            helper.make_node("Cast", [f"{p}/rows_int8"], [f"{p}/rows"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [h, f"{c}_axis_m2"], [f"{p}/h"], name=f"{p}/Unsqueeze"),
            helper.make_node("Mul", [f"{p}/rows", f"{p}/h"], [f"{p}/products"], name=f"{p}/Mul_h"),
            helper.make_node("ReduceSum", [f"{p}/products", f"{c}_axis_m1"], [f"{p}/dots"], name=f"{p}/ReduceSum", keepdims=0),
        ]
        if self.host is None:
            nodes.append(helper.make_node("Gather", [self.scales, ids], [scales], name=f"{p}/Gather_scales", axis=0))
        else:  # the table's rows carry the embedding multiplier: divide it out of their scales
            nodes += [helper.make_node("Gather", [self.scales, ids], [f"{p}/table_scales"], name=f"{p}/Gather_scales", axis=0),
                      helper.make_node("Mul", [f"{p}/table_scales", f"{c}_inv_embed_scale"], [scales], name=f"{p}/Mul_inv_embed_scale")]
        nodes.append(helper.make_node("Mul", [f"{p}/dots", scales], [dots_scaled], name=f"{p}/Mul_scales"))
        if self.host is not None:  # rows past the head's own (hard-token rows) keep the 4-bit logit
            nodes += [helper.make_node("Less", [ids, f"{c}_exact_rows"], [f"{p}/is_head_row"], name=f"{p}/Less"),
                      helper.make_node("Where", [f"{p}/is_head_row", dots_scaled, values], [exact], name=f"{p}/Where")]
        nodes.append(helper.make_node("ScatterElements", [approx, ids, exact], [out], name=f"{p}/ScatterElements", axis=-1))
        return nodes


def rescore_nodes(w: np.ndarray, k: int, stem: str, store: TensorStore, host: HostRows | None = None) -> Rescoring:
    """The rescoring of an LM head whose float weight is W [D, V]: its int8 rows written through
    `store` once (or, with `host`, read from the host table's rows), and the nodes to place after
    each node that reads the head."""
    if k <= 0:
        raise ValueError(f"{stem}: rescoring {k} candidates")
    d, v = w.shape
    k = min(k, v)  # a tiny vocabulary is rescored whole
    consts = [numpy_helper.from_array(np.array([k], dtype=np.int64), f"{stem}.rescore_k"),
              numpy_helper.from_array(np.array([-2], dtype=np.int64), f"{stem}.rescore_axis_m2"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{stem}.rescore_axis_m1")]
    if host is not None:
        consts += [numpy_helper.from_array(np.array(1.0 / host.scale, dtype=np.float32), f"{stem}.rescore_inv_embed_scale"),
                   numpy_helper.from_array(np.array(host.exact_rows, dtype=np.int64), f"{stem}.rescore_exact_rows")]
        inputs = (helper.make_tensor_value_info(ROWS_INPUT, onnx.TensorProto.INT8, [v, d]),
                  helper.make_tensor_value_info(SCALES_INPUT, onnx.TensorProto.FLOAT, [v]))
        return Rescoring(consts, stem, ROWS_INPUT, SCALES_INPUT, host, inputs)
    q, scale = int8_rows(w)
    rows = store.write(f"{stem}.rescore_rows_int8", q)
    scales = store.write(f"{stem}.rescore_row_scales", scale)
    del q
    return Rescoring([*consts, rows, scales], stem, rows.name, scales.name)
