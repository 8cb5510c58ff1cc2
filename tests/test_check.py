"""gemma-export check: static shapes, ops outside a target, node placement, sizes, per graph.

The expected op sets are recomputed here from the graph file and the target's TOML; placement is
compared with the graph's own node count and with what a plain CPU session runs."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from pathlib import Path

import onnx
import pytest

from gemma_export.check import check_export
from gemma_export.cli import main as export_main
from gemma_export.errors import ExportError
from gemma_runtime.providers import PROVIDERS, is_available

REPO = Path(__file__).resolve().parent.parent


def _ops(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    return Counter((n.domain, n.op_type) for n in model.graph.node)


def test_cpu_export_fits_the_cpu_target(tiny):
    out = tiny.export("gemma3_sw8")
    report = check_export(out)
    assert report.target == "cpu" and report.ok, report.problems
    (graph,) = report.graphs
    ops = _ops(out / "decoder.onnx")
    assert graph.name == "decoder" and graph.nodes == sum(ops.values()) and not graph.unsupported
    assert not graph.static and all(d.endswith("=T") for d in graph.dynamic_dims)
    assert "inputs_embeds[1]=T" in graph.dynamic_dims
    assert graph.bytes == (out / "decoder.onnx").stat().st_size + (out / "decoder.data").stat().st_size
    (cpu,) = graph.placements
    assert cpu.provider == "cpu" and cpu.complete and set(cpu.nodes) == {"CPUExecutionProvider"}
    assert cpu.nodes["CPUExecutionProvider"] > 0


def test_cpu_export_against_the_npu_target(tiny):
    """The CPU graph is not an NPU graph: symbolic T, ops outside QNN's list (recomputed here from
    targets/qnn-htp.toml), and, where onnxruntime-qnn is installed, every float node left off the
    HTP."""
    out = tiny.export("gemma3_sw8")
    report = check_export(out, target="qnn-htp")
    (graph,) = report.graphs
    allowed = set(tomllib.loads((REPO / "targets" / "qnn-htp.toml").read_text())["ops"]["standard"])
    expected = Counter()
    for (domain, op), n in _ops(out / "decoder.onnx").items():
        if domain not in ("", "ai.onnx") or op not in allowed:
            expected[op if domain in ("", "ai.onnx") else f"{domain}:{op}"] += n
    assert graph.unsupported == dict(expected) and expected  # Range/Mod of the position arithmetic
    assert not report.ok
    assert any("needs static shapes" in p for p in report.problems)
    assert any("ops outside target qnn-htp" in p for p in report.problems)
    if is_available(PROVIDERS["qnn"]):
        (qnn,) = graph.placements
        assert not qnn.complete
        if qnn.error is None:
            assert qnn.nodes.get("QNNExecutionProvider", 0) == 0  # float graph: the HTP takes no node
            assert sum(qnn.off_provider.values()) == sum(qnn.nodes.values())
        else:
            # onnxruntime-qnn 2.7 on onnxruntime 1.32 claims a few float nodes (Sub, Reshape, ...) of
            # the float graph and then fails to finalize them: reported as the session's failure
            assert f"decoder: qnn: session failed: {qnn.error}" in report.problems
    else:
        assert graph.not_installed == ("qnn",)


def test_cli_exit_codes_and_json(tiny, capsys):
    out = tiny.export("gemma3_sw8")
    assert export_main(["check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "against target cpu" in text and "CPUExecutionProvider" in text and text.rstrip().endswith("ok")
    assert export_main(["check", str(out), "--target", "qnn-htp", "--provider", "cpu", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "qnn-htp" and report["problems"]
    assert [p["provider"] for p in report["graphs"][0]["placements"]] == ["cpu"]


def test_bad_input(tmp_path, tiny):
    with pytest.raises(ExportError, match="not an export folder"):
        check_export(tmp_path)
    with pytest.raises(ExportError, match="unknown provider.*tpu"):
        check_export(tiny.export("gemma3_sw8"), providers=("tpu",))
    with pytest.raises(ExportError, match="--target toaster is not a target"):
        check_export(tiny.export("gemma3_sw8"), target="toaster")


def test_int4_export_uses_only_ops_the_cuda_provider_implements(tiny, tmp_path):
    """The cuda target's graphs (MatMulNBits weights, the ort-fusions contrib ops) keep to the
    contrib ops that have a CUDA kernel (targets/cuda.toml, from onnxruntime's kernel list)."""
    from gemma_export.package import requantize_export
    from gemma_export.recipes import make_recipe

    out = tmp_path / "int4"
    requantize_export(tiny.export("gemma3_sw8"), out, make_recipe("int4"))
    report = check_export(out, target="cuda", providers=("cpu",))
    (graph,) = report.graphs
    contrib = {op for op in graph.ops if op.startswith("com.microsoft:")}
    assert "com.microsoft:MatMulNBits" in contrib and not graph.unsupported
    assert report.ok, report.problems
    # the same graph against an NPU target: every contrib op is outside it
    npu = check_export(out, target="qnn-htp", providers=())
    assert contrib <= set(npu.graphs[0].unsupported)
