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
(passes/logits.py) scores the same way. The int8 rows cost V x D bytes of memory more (they are
read only K rows a step); onnxruntime has no op that takes both formats from one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .store import TensorStore


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of W^T [N, K] (W is the MatMul's [K, N]) as int8 with one float32 scale per row:
    symmetric round-to-nearest, max |row| -> 127."""
    rows = np.ascontiguousarray(w.T)
    scale = (np.abs(rows).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(rows / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class Rescoring:
    """The int8 rows of one LM head weight and the constants its rescoring nodes read."""

    tensors: list[onnx.TensorProto]  # rows, row scales, k, the two axes
    stem: str

    def nodes(self, h: str, approx: str, out: str) -> list[onnx.NodeProto]:
        """Nodes that make `out` from the approximate logits `approx` of the head's input `h`."""
        rows, scales, k_name, ax2, ax1 = (t.name for t in self.tensors)
        p = f"/{self.stem}/rescore/{out.strip('/')}"  # one set of names per head output
        return [
            helper.make_node("TopK", [approx, k_name], [f"{p}/values", f"{p}/ids"], name=f"{p}/TopK", axis=-1),
            helper.make_node("Gather", [rows, f"{p}/ids"], [f"{p}/rows_int8"], name=f"{p}/Gather_rows", axis=0),
            helper.make_node("Cast", [f"{p}/rows_int8"], [f"{p}/rows"], name=f"{p}/Cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [h, ax2], [f"{p}/h"], name=f"{p}/Unsqueeze"),
            helper.make_node("Mul", [f"{p}/rows", f"{p}/h"], [f"{p}/products"], name=f"{p}/Mul_h"),
            helper.make_node("ReduceSum", [f"{p}/products", ax1], [f"{p}/dots"], name=f"{p}/ReduceSum", keepdims=0),
            helper.make_node("Gather", [scales, f"{p}/ids"], [f"{p}/scales"], name=f"{p}/Gather_scales", axis=0),
            helper.make_node("Mul", [f"{p}/dots", f"{p}/scales"], [f"{p}/exact"], name=f"{p}/Mul_scales"),
            helper.make_node("ScatterElements", [approx, f"{p}/ids", f"{p}/exact"], [out], name=f"{p}/ScatterElements",
                             axis=-1),
        ]


def rescore_nodes(w: np.ndarray, k: int, stem: str, store: TensorStore) -> Rescoring:
    """The rescoring of an LM head whose float weight is W [D, V]: its int8 rows written through
    `store` once, and the nodes to place after each node that reads the head."""
    q, scale = int8_rows(w)
    if k <= 0:
        raise ValueError(f"{stem}: rescoring {k} candidates")
    k = min(k, q.shape[0])  # a tiny vocabulary is rescored whole
    rows = store.write(f"{stem}.rescore_rows_int8", q)
    scales = store.write(f"{stem}.rescore_row_scales", scale)
    del q
    consts = [numpy_helper.from_array(np.array([k], dtype=np.int64), f"{stem}.rescore_k"),
              numpy_helper.from_array(np.array([-2], dtype=np.int64), f"{stem}.rescore_axis_m2"),
              numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{stem}.rescore_axis_m1")]
    return Rescoring([rows, scales, *consts], stem)
