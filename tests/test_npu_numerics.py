"""Numerics of the NPU graphs that the emulated HTP and onnxruntime's CPU provider must agree on
(bench/npu_divergence.py found both on the real Gemma 3 270M):

- passes/rms_norm.py: layers.py's RMSNorm, exported as x * (mean(x^2) + eps)^-0.5 * w, becomes one
  RMSNormalization node (opset 23) with the same values, with and without a scale;
- passes/qdq.py cpu_reference_options: the CPU provider runs a QDQ MatMul of int8 weights and a
  uint16 activation as the graph says (float between the Q/DQ pairs); by default onnxruntime fuses
  it into MatMulNBits and rounds the activation to int8, hundreds of uint16 steps off."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gemma_export.model.layers import RMSNorm
from gemma_export.passes.qdq import cpu_reference_options
from gemma_export.passes.rms_norm import RMS_NORM_OPSET, fuse_rms_norm


class _Norms(torch.nn.Module):
    """A scaled norm over the hidden size, then an unscaled one over a head dimension (Gemma 3n's
    v_norm), as the decoder uses them."""

    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(16, 1e-6)
        self.head_norm = RMSNorm(4, 1e-6, with_scale=False)
        with torch.no_grad():
            self.norm.weight.copy_(torch.linspace(0.5, 3.0, 16))

    def forward(self, x):
        return self.head_norm(self.norm(x).reshape(1, 3, 4, 4)) * 2.0


def _export(module, x) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (x,), input_names=["x"], output_names=["y"], opset_version=21,
                                 dynamo=True, optimize=True, verbose=False).model_proto


def test_rms_norm_becomes_one_node_with_the_same_values():
    x = torch.randn(1, 3, 16) * torch.tensor([1.0, 30.0, 1000.0])[None, :, None]  # the residual stream's spread
    model = _export(_Norms(), x)
    fused, count = fuse_rms_norm(model)
    assert count == 2
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("RMSNormalization") == 2 and "Pow" not in ops and "ReduceMean" not in ops
    assert [o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")] == [RMS_NORM_OPSET]
    assert [n.op_type for n in model.graph.node].count("Pow") == 4  # the pure pass left its input as it was
    onnx.checker.check_model(fused)
    feeds = {"x": x.numpy()}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _qdq_matmul(k: int, n: int, x_range: float, y_range: float, w_codes: np.ndarray, w_scale: np.ndarray):
    """x (float) -> Q/DQ uint16 -> MatMul with DQ(int8 per-channel w) -> Q uint16 (the output codes)."""
    def q16(name, r):
        s, zp = np.float32(2 * r / 65535), np.uint16(32768)
        tensors = [numpy_helper.from_array(np.array(s), f"{name}.s"),
                   numpy_helper.from_array(np.array(zp), f"{name}.z")]
        return tensors, s, zp

    xi, sx, zx = q16("x", x_range)
    yi, sy, zy = q16("y", y_range)
    inits = xi + yi + [numpy_helper.from_array(w_codes, "w.q"), numpy_helper.from_array(w_scale, "w.s"),
                       numpy_helper.from_array(np.zeros(n, np.int8), "w.z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.s", "x.z"], ["x.q"]),
             helper.make_node("DequantizeLinear", ["x.q", "x.s", "x.z"], ["x.dq"]),
             helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"], axis=1),
             helper.make_node("MatMul", ["x.dq", "w"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "y.s", "y.z"], ["y.q"])]
    graph = helper.make_graph(nodes, "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y.q", TensorProto.UINT16, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), (sx, zx), (sy, zy)


@pytest.mark.parametrize("reference", [True, False])
def test_cpu_reference_runs_a_qdq_matmul_as_the_graph_says(reference):
    rng = np.random.default_rng(0)
    k, n = 640, 256
    x = (rng.standard_normal((1, k)) * 3).astype(np.float32)
    codes = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = rng.uniform(0.0005, 0.002, n).astype(np.float32)
    y_range = float(np.abs(x @ (codes * scale)).max())
    model, (sx, zx), (sy, zy) = _qdq_matmul(k, n, 12.0, y_range, codes, scale)
    xq = (np.clip(np.round(x / sx) + zx, 0, 65535) - zx) * sx
    exact = np.clip(np.round((xq.astype(np.float64) @ (codes * scale.astype(np.float64))) / sy) + zy, 0, 65535)
    options = cpu_reference_options() if reference else ort.SessionOptions()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    steps = np.abs(got.astype(np.int64) - exact).max()
    if reference:
        assert steps <= 1
    else:  # onnxruntime's default: MatMulNBits with int8 activations (if this starts to hold, drop the option)
        assert steps > 16


def _qdq_rms_norm(shape, x_range: float, y_range: float, weight: np.ndarray) -> onnx.ModelProto:
    """x -> Q/DQ uint16 -> RMSNormalization(x, DQ(uint16 w)) -> Q uint16 (the output codes)."""
    def scale_zp(lo, hi):
        s = np.float32((hi - lo) / 65535)
        return s, np.uint16(round(-lo / s))

    sx, zx = scale_zp(-x_range, x_range)
    sy, zy = scale_zp(-y_range, y_range)
    sw, zw = scale_zp(0.0, float(weight.max()))
    inits = [numpy_helper.from_array(np.array(v), n) for v, n in
             ((sx, "x.s"), (zx, "x.z"), (sy, "y.s"), (zy, "y.z"), (sw, "w.s"), (zw, "w.z"))]
    inits.append(numpy_helper.from_array(np.round(weight / sw).astype(np.uint16), "w.q"))
    nodes = [helper.make_node("QuantizeLinear", ["x", "x.s", "x.z"], ["x.q"]),
             helper.make_node("DequantizeLinear", ["x.q", "x.s", "x.z"], ["x.dq"]),
             helper.make_node("DequantizeLinear", ["w.q", "w.s", "w.z"], ["w"]),
             helper.make_node("RMSNormalization", ["x.dq", "w"], ["y"], axis=-1, epsilon=1e-6),
             helper.make_node("QuantizeLinear", ["y", "y.s", "y.z"], ["y.q"])]
    graph = helper.make_graph(nodes, "qdq_rms_norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y.q", TensorProto.UINT16, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", RMS_NORM_OPSET)])


def test_htp_rms_norm_matches_the_cpu_over_four_decades():
    """The residual stream of the real 270M spans rows of rms ~1 to ~1000; the HTP's RmsNorm holds
    them all to a step or two of the CPU (the exported Pow(-0.5) chain was hundreds of steps off and
    saturated past fp16's range)."""
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")
    from gemma_runtime.providers import configure_session

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 640)) * np.array([1.0, 10.0, 100.0, 1000.0])[None, :, None]).astype(np.float32)
    model = _qdq_rms_norm(list(x.shape), 4000.0, 12.0, np.linspace(0.5, 3.0, 640).astype(np.float32))
    cpu = ort.InferenceSession(model.SerializeToString(), cpu_reference_options(), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    providers = configure_session(options, "QNNExecutionProvider")  # CPU fallback off
    htp = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    c, h = (s.run(None, {"x": x})[0].astype(np.int64) for s in (cpu, htp))
    assert np.abs(c - h).max() <= 2  # measured 1
