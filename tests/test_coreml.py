"""The coreml target: static prefill (T = chunk) and decode (T = 1) float graphs, as the NPU build
makes them, with every op in the CoreML provider's ML Program list (targets/coreml.toml).

CoreML runs only on Apple hardware, so here the graphs run on onnxruntime's CPU provider (the
target's second provider), through the runtime's NPU-style loop (gemma_runtime/npu_decoder.py),
against the eager model with DESIGN.md's fp32 budget; `gemma-export check` proves the op list.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import PROMPT_LEN, prompt_ids, teacher_forced_logits

FAMILIES = ["gemma", "gemma3_sw8", "gemma3n"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def coreml_export(tiny):
    return lambda family, quant: tiny.target_export(family, "coreml", quant)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_coreml_build_is_static_and_in_the_coreml_op_list(family, coreml_export):
    from gemma_export.check import check_export
    from gemma_runtime.manifest import read_manifest

    for quant in ("fp32", "fp16"):
        out = coreml_export(family, quant)
        manifest = read_manifest(out)
        assert (manifest.target, manifest.providers, manifest.quant) == ("coreml", ("coreml", "cpu"), quant)
        assert set(manifest.graphs) == {"prefill", "decode"} and manifest.npu_inputs is not None
        report = check_export(out)
        assert report.ok, report.problems
        for graph in report.graphs:
            assert graph.static and not graph.unsupported, (graph.name, graph.unsupported)
            assert not {"Neg", "Gather", "RMSNormalization"} & set(graph.ops), graph.ops
            assert ("Cast" in graph.ops) == (quant == "fp16")  # float16 weights, cast to float32 in the graph
        assert manifest.provenance["ops_outside_target"] == {}
        rewrites = manifest.provenance["coreml_rewrites"]
        assert rewrites["prefill"].get("Neg", 0) > 0  # rotary's rotate-half
        assert (rewrites["prefill"].get("Gather", 0) > 0) == (family == "gemma3n")  # AltUp's streams
    sizes = {q: (coreml_export(family, q) / "prefill.onnx.data").stat().st_size for q in ("fp32", "fp16")}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_coreml_build_runs_as_eager_does(family, coreml_export, tiny):
    """fp32: the runtime's static-graph loop on the CPU provider against eager transformers, within
    DESIGN.md's budget; fp16 weights: the same top-1 tokens, logits a little off."""
    from gemma_runtime.npu_decoder import NpuModel, load_model

    prompt = prompt_ids()
    fp32 = load_model(coreml_export(family, "fp32"), provider="cpu")
    assert isinstance(fp32, NpuModel)
    tokens = fp32.generate_ids(prompt, max_new_tokens=NEW_TOKENS)
    assert len(tokens) == NEW_TOKENS
    ids = prompt + tokens
    ours = teacher_forced_logits(fp32, ids)[:-1]
    with torch.no_grad():
        expected = tiny.reference(family)(torch.tensor([ids])).logits[0].float().numpy()[PROMPT_LEN - 1:-1]
    diff, scale = float(np.abs(ours - expected).max()), max(1.0, float(np.abs(expected).max()))
    half = teacher_forced_logits(load_model(coreml_export(family, "fp16"), provider="cpu"), ids)[:-1]
    top1 = float(np.mean(half.argmax(-1) == expected.argmax(-1)))
    print(f"\n{family} coreml fp32 vs eager: max |diff| {diff:.3g} (|ref| {scale:.3g}); fp16 weights: max |diff| "
          f"{float(np.abs(half - expected).max()):.3g}, top-1 {top1:.0%}")
    assert diff <= 1e-4 * scale
    assert tokens == [int(t) for t in expected.argmax(-1)]
    assert top1 >= 0.9


def test_ops_outside_the_list_are_counted_and_the_rewrites_remove_neg_and_gather():
    """A graph with Neg, a constant Gather and a CumSum: ops_outside names all three; after
    coreml_rewrites only the CumSum is left, and the outputs are unchanged."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gemma_export.check import ops_outside
    from gemma_export.passes.coreml import coreml_rewrites
    from gemma_export.targets import load_target

    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Gather", ["n", "i"], ["g"], axis=1),
         helper.make_node("CumSum", ["g", "axis"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(2, np.int64), "i"), numpy_helper.from_array(np.array(1, np.int32), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    coreml = load_target("coreml")
    assert ops_outside(model, coreml) == {"CumSum": 1, "Gather": 1, "Neg": 1}
    rewritten, counts = coreml_rewrites(model)
    assert counts == {"Neg": 1, "Gather": 1} and ops_outside(rewritten, coreml) == {"CumSum": 1}
    onnx.checker.check_model(rewritten)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    assert np.array_equal(run(model), run(rewritten))
