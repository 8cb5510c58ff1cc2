"""The encoder graphs of the tiny multimodal export (conftest.py `multimodal`) are static.

vision.onnx and audio.onnx take fixed-size inputs ([1,3,768,768]; 30 s of features and their mask)
and give fixed-size soft embeddings, so every tensor in them has a known shape: no symbolic
dimension on an input or output (what `gemma-export check` reports per graph), none on any
intermediate value once onnx's shape inference has run over the graph, and no op whose output
shape or control flow depends on the data (NonZero, Unique, Loop, If, Scan, ...). An NPU target
compiles such a graph once; a data-dependent op would make it fall back or refuse.
"""

from __future__ import annotations

import pytest

DATA_DEPENDENT = ("NonZero", "Unique", "Loop", "If", "Scan", "Compress", "NonMaxSuppression",
                  "SequenceConstruct", "SplitToSequence")


@pytest.fixture(scope="module")
def report(multimodal):
    from gemma_export.check import check_export

    return check_export(multimodal[1], providers=())  # no sessions: placement is not the question here


@pytest.mark.parametrize("graph", ["vision", "audio"])
def test_inputs_and_outputs_are_static(report, graph):
    (g,) = [g for g in report.graphs if g.name == graph]
    assert g.static and g.dynamic_dims == (), g.dynamic_dims


@pytest.mark.parametrize("graph", ["vision", "audio"])
def test_no_data_dependent_ops(report, graph):
    (g,) = [g for g in report.graphs if g.name == graph]
    found = {op: n for op, n in g.ops.items() if op.split(":")[-1] in DATA_DEPENDENT}
    assert not found, f"{graph}.onnx has data-dependent ops: {found}"


def _unknown_dims(value) -> list[str]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return [f"{value.name}: no shape"]
    return [f"{value.name}[{axis}]={dim.dim_param or '?'}" for axis, dim in enumerate(tensor.shape.dim)
            if not dim.HasField("dim_value")]


@pytest.mark.parametrize("graph", ["vision", "audio"])
def test_every_value_has_a_static_shape(multimodal, graph):
    """Shape inference from the inputs alone (the exporter's own value_info dropped first), in
    strict mode: every node output gets a type, every dimension a number."""
    import onnx

    model = onnx.load(str(multimodal[1] / f"{graph}.onnx"), load_external_data=False)
    assert not model.functions, "local functions: their bodies would need their own check"
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    values = {v.name: v for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    produced = [name for node in inferred.graph.node for name in node.output if name]
    unknown = [name for name in produced if name not in values]
    assert not unknown, f"{len(unknown)} value(s) without an inferred type, e.g. {unknown[:5]}"
    symbolic = [d for v in values.values() for d in _unknown_dims(v)]
    assert not symbolic, f"{len(symbolic)} symbolic or unknown dim(s) in {graph}.onnx, e.g. {symbolic[:5]}"
