"""NPU target (qnn-htp): static QDQ prefill/decode graphs that run entirely on the QNN HTP backend
(PyPI's onnxruntime-qnn; on x86-64 its HTP is an emulator) with onnxruntime's CPU fallback off.

References: the fp32 CPU export of the same tiny checkpoint (the float NPU graph must equal it; the
QDQ graphs must stay close to it), and the same QDQ graphs on onnxruntime's CPU provider (the HTP
run must agree with it). Random tiny models have nearly flat logits (max |logit| ~3 over 300 ids),
so agreement is measured by KL divergence, not by argmax."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import npu_exports
from conftest import PREFILL_CHUNK
from gemma_export.check import check_export
from gemma_export.checkpoint import open_checkpoint
from gemma_export.npu_driver import NpuDriver
from gemma_export.passes.qdq import cpu_reference_options
from gemma_export.variants import variant_from_config
from gemma_runtime import Model
from gemma_runtime.session_cache import _create

# Gemma 3 (sliding ring = chunk), Gemma (MQA) and the tiny Gemma 3n (AltUp, LAuReL, per-layer
# inputs, KV sharing) in every run: Gemma 3n's two static exports and QDQ passes took ~3 minutes
# once, 41 s for its two tests here now (2026-12-02, 2 cores)
FAMILIES = ("gemma3_sw8", "gemma", "gemma3n")
PROMPT_LEN, DECODE_STEPS = PREFILL_CHUNK + 4, 5  # a full chunk, a partial one, then single-token steps


def _ids(seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, 299, PROMPT_LEN).tolist(), rng.integers(3, 299, DECODE_STEPS).tolist()


def _reference(export, prompt, continuation) -> np.ndarray:
    """Teacher-forced logits of the fp32 CPU export: after the prompt, then after each id."""
    model = Model.load(export, provider="cpu")
    for first in range(0, len(prompt), PREFILL_CHUNK):
        logits = model._step(np.array(prompt[first:first + PREFILL_CHUNK]), first, PREFILL_CHUNK)
    rows, position = [logits], len(prompt)
    for token in continuation:
        rows.append(model._step(np.array([token]), position, PREFILL_CHUNK))
        position += 1
    return np.concatenate(rows)


def _rsqrt_pows(model) -> list[str]:
    """Pow nodes whose exponent is the constant -0.5."""
    from onnx import numpy_helper

    small = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
             if not i.external_data and np.prod(i.dims) == 1}
    return [n.name for n in model.graph.node
            if n.op_type == "Pow" and n.input[1] in small and float(small[n.input[1]].reshape(-1)[0]) == -0.5]


def _driver(folder, checkpoint) -> NpuDriver:
    return NpuDriver.for_export(folder, variant_from_config(open_checkpoint(str(checkpoint)).config))


def _run(folder, checkpoint, provider: str, prompt, continuation) -> np.ndarray:
    """The export's prefill/decode graphs on `provider` (QNN: the runtime's session, CPU fallback off)."""
    options = cpu_reference_options if provider == "CPUExecutionProvider" else ort.SessionOptions
    sessions = {g: _create(folder / f"{g}.onnx", options(), provider) for g in ("prefill", "decode")}
    if provider == "QNNExecutionProvider":
        assert sessions["decode"].get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    return np.concatenate(_driver(folder, checkpoint).teacher_forced(lambda g, f: sessions[g].run(None, f), prompt, continuation))


@pytest.fixture(scope="module")
def npu_export(tiny, tmp_path_factory):
    """family -> (export folder, folder of its float prefill/decode graphs): tests/npu_exports.py's,
    shared with tests/test_runtime_npu.py."""
    return lambda family: npu_exports.npu_export(tiny, tmp_path_factory, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_npu_graphs_equal_the_cpu_graph(family, tiny, npu_export):
    """The NPU restructuring (host rope tables, additive masks, one-hot last row, static T, every
    RMSNorm one RMSNormalization node) is exact: the float prefill/decode graphs match the CPU export
    over two chunks and decode steps, and hold none of the CPU graph's index arithmetic nor an
    elementwise rsqrt (Pow -0.5, which the HTP computes far from the CPU)."""
    import onnx

    _, float_dir = npu_export(family)
    sessions = {}
    for graph in ("prefill", "decode"):
        model = onnx.load(str(float_dir / f"{graph}.onnx"), load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"Range", "Mod", "Where", "Cast", "Less", "Greater", "And", "Shape"}, ops
        assert "RMSNormalization" in ops and not _rsqrt_pows(model)
        assert all(d.HasField("dim_value") for v in model.graph.input for d in v.type.tensor_type.shape.dim)
        sessions[graph] = ort.InferenceSession(str(float_dir / f"{graph}.onnx"), providers=["CPUExecutionProvider"])
    prompt, continuation = _ids(1)
    export = tiny.export(family)
    driver = _driver(export, tiny.checkpoint(family))  # the CPU export's host tables: the same rows
    got = np.concatenate(driver.teacher_forced(lambda g, f: sessions[g].run(None, f), prompt, continuation))
    want = _reference(export, prompt, continuation)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_npu_export_runs_entirely_on_the_htp(family, tiny, npu_export):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")
    out, _ = npu_export(family)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "qnn-htp" and manifest["providers"] == ["qnn"]
    assert sorted(manifest["graphs"]) == ["decode", "prefill"]
    assert manifest["provenance"]["quant_recipe"]["activations"] == "uint16"

    # gemma-export check: static, standard ops in QNN's list, every node placed on the HTP
    report = check_export(out)
    assert report.ok, report.problems
    for graph in report.graphs:
        assert graph.static and not graph.unsupported
        spec = manifest["graphs"][graph.name]
        on_disk = [out / f for f in (spec["file"], spec["data_file"]) if f]
        assert graph.bytes == sum(f.stat().st_size for f in on_disk)
        assert {f.name for f in out.iterdir() if f.name.startswith(graph.name + ".")} == {f.name for f in on_disk}
        (qnn,) = graph.placements
        assert set(qnn.nodes) == {"QNNExecutionProvider"} and qnn.nodes["QNNExecutionProvider"] >= graph.nodes

    # the HTP (CPU fallback disabled) agrees with onnxruntime's CPU run of the same QDQ graphs, and
    # the QDQ graphs stay close to the fp32 CPU export
    prompt, continuation = _ids(2)
    cpu = _run(out, tiny.checkpoint(family), "CPUExecutionProvider", prompt, continuation)
    htp = _run(out, tiny.checkpoint(family), "QNNExecutionProvider", prompt, continuation)
    fp32 = _reference(tiny.export(family), prompt, continuation)
    # (CPU: cpu_reference_options, the QDQ graph as it says; measured with RMSNormalization norms)
    assert npu_exports.kl_divergence(cpu, htp) < 0.01  # measured 0.0001..0.0004 (Gemma 3n before RMSNormalization: 0.004)
    assert np.abs(htp - cpu).max() < 0.15 * np.abs(cpu).max()  # measured 3..4 %
    assert npu_exports.kl_divergence(fp32, cpu) < 0.05  # measured 0.001..0.007 (uint16 activations, int8 weights)
