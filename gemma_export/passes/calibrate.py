"""Activation statistics for importance-weighted quantization (llama.cpp's imatrix, in ONNX).

For every weight MatMul y = x @ W (W [K, N]) the importance of input channel k is the mean over
calibration tokens of x_k^2: the output error of a weight error d[k, n] is sum_k x_k d[k, n], whose
expected square (channels taken as uncorrelated) is sum_k E[x_k^2] d[k, n]^2. The block search in
blockwise.py then minimizes sum_k imp_k (w_k - q(w_k))^2 instead of the plain squared error.

    calibration_variant(model)   the all-positions decoder with each weight MatMul's input added as
                                 a graph output (pure: ModelProto -> ModelProto, plus the names)
    accumulate(stats, outputs)   sum of x^2 and token count per input (pure numpy)
    importance(stats, inputs)    weight name -> imp [K] (mean x^2), what quantize_matmuls takes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .logits import all_positions_logits
from .matmuls import weight_matmuls


@dataclass
class InputStats:
    """Running sums of x^2 per input channel, per MatMul input tensor."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # input name -> sum over tokens of x^2 [K]
    tokens: int = 0


def calibration_variant(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """The all-positions decoder whose outputs also hold every weight MatMul's input (x [.., K]),
    and {input name: [weight names it multiplies]} (q/k/v share one input, gate/up another)."""
    inputs: dict[str, list[str]] = {}
    for wm in weight_matmuls(model):
        name = model.graph.node[wm.nodes[0]].input[0]
        inputs.setdefault(name, []).append(wm.weight)
    out = all_positions_logits(model)
    present = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in inputs:
        if name not in present:
            out.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out, inputs


def accumulate(stats: InputStats, named: dict[str, np.ndarray], valid: int) -> InputStats:
    """Adds the first `valid` positions of each MatMul input [1, T, K] (or [T, K]) to `stats`."""
    for name, x in named.items():
        rows = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])[:valid]
        s = (rows.astype(np.float64) ** 2).sum(axis=0)
        stats.sums[name] = stats.sums[name] + s if name in stats.sums else s
    stats.tokens += valid
    return stats


def importance(stats: InputStats, inputs: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Weight name -> mean x^2 per input channel [K] (float32)."""
    if stats.tokens == 0:
        raise ValueError("no calibration tokens")
    out = {}
    for name, weights in inputs.items():
        imp = (stats.sums[name] / stats.tokens).astype(np.float32)
        for w in weights:
            out[w] = imp
    return out
