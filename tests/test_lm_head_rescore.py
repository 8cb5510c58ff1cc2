"""The 4-bit LM head whose best K candidates are rescored from int8 rows (passes/rescore.py).

The reference is numpy: the 4-bit head's logits (the MatMulNBits weight unpacked by the layout
of onnxruntime's docs, tests/test_quant_passes.py), their top K replaced by the dot products
with the int8 rows times the row scales. Real-weight quality (Gemma 3 270M, K = 512 < V) is
tests/test_quant_real.py's int4 floor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gemma_export.errors import ExportError
from gemma_export.passes import TensorStore, quantize_matmuls
from gemma_export.passes.logits import all_positions_logits
from gemma_export.passes.rescore import int8_rows
from gemma_export.recipes import LM_HEAD4_BLOCK, Recipe, RecipeOptions, WeightFormat, make_recipe
from test_quant_passes import unpack_matmulnbits

D, V, T = 64, 300, 5


def _head_graph(w: np.ndarray) -> onnx.ModelProto:
    """h [1, T, D] -> MatMul(lm_head_t) -> logits [1, T, V], as the exporter names the LM head."""
    node = helper.make_node("MatMul", ["h", "decoder.lm_head_t"], ["logits"], name="lm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "T", D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", V])],
                              [numpy_helper.from_array(w, "decoder.lm_head_t")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, h: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"h": h})[0]


def _quantized(w: np.ndarray, k: int) -> onnx.ModelProto:
    """The head in 4-bit blocks of 16, its k best candidates rescored (k = 0: none)."""
    head = WeightFormat(bits=4, block_size=16, accuracy_level=0)
    return quantize_matmuls(_head_graph(w), Recipe("t", lm_head=head, lm_head_rescore=k), TensorStore(None))


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_logits_are_the_int8_rows_and_the_rest_the_4_bit_head(k):
    rng = np.random.default_rng(k)
    w = rng.standard_normal((D, V)).astype(np.float32)
    h = rng.standard_normal((1, T, D)).astype(np.float32)
    model = _quantized(w, k)
    got = _run(model, h)

    # the 4-bit head alone: the same codes, the same kernel (bit-equal), and its weight unpacked
    approx = _run(_quantized(w, 0), h)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mm = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    w4 = unpack_matmulnbits(inits[mm.input[1]], inits[mm.input[2]], None, D, V, 4, 16)
    np.testing.assert_allclose(approx, h @ w4, rtol=1e-5, atol=1e-4)
    rows, scales = int8_rows(w)
    ids = np.argsort(-approx, axis=-1, kind="stable")[..., :k]
    want = approx.copy()
    exact = np.einsum("td,tkd->tk", h[0], rows[ids[0]].astype(np.float32)) * scales[ids[0]]
    np.put_along_axis(want[0], ids[0], exact, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # the rescored logits are close to the float head's, the others carry the 4-bit error
    ref = h @ w
    mask = np.zeros_like(ref, dtype=bool)
    np.put_along_axis(mask[0], ids[0], True, axis=-1)
    err8, err4 = np.abs(got - ref)[mask].max(), np.abs(approx - ref)[mask].max()
    assert err8 < err4 / 4, (err8, err4)
    assert np.array_equal(got[~mask], approx[~mask])


def test_a_vocabulary_smaller_than_k_is_rescored_whole():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((D, V)).astype(np.float32)
    h = rng.standard_normal((1, T, D)).astype(np.float32)
    rows, scales = int8_rows(w)
    want = np.einsum("td,vd->tv", h[0], rows.astype(np.float32)) * scales
    np.testing.assert_allclose(_run(_quantized(w, 10 * V), h)[0], want, rtol=1e-5, atol=1e-4)


def test_int8_rows_round_each_row_to_its_own_scale():
    w = np.array([[1.0, -0.5, 0.0], [2.0, 0.25, 0.0]], dtype=np.float32)  # [K=2, N=3]
    rows, scales = int8_rows(w)
    assert rows.dtype == np.int8 and rows.shape == (3, 2)
    np.testing.assert_allclose(scales, [2.0 / 127, 0.5 / 127, 0.0])
    assert rows[:, 1].tolist() == [127, 64, 0] and rows[0, 0] == 64 and rows[1, 0] == -127


def test_the_eval_variant_scores_every_position_the_same_way():
    """all_positions_logits finds the last-position Gather behind the rescoring's own Gathers."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((D, V)).astype(np.float32)
    # a decoder tail: hidden [1, T, D] -> Gather(valid - 1, axis 1) -> LM head -> Reshape [1, V]
    nodes = [helper.make_node("Sub", ["valid", "one"], ["last"]),
             helper.make_node("Gather", ["hidden", "last"], ["picked"], axis=1),
             helper.make_node("MatMul", ["picked", "decoder.lm_head_t"], ["raw"], name="lm"),
             helper.make_node("Reshape", ["raw", "shape"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "T", D]),
                                           helper.make_tensor_value_info("valid", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V])],
                              [numpy_helper.from_array(w, "decoder.lm_head_t"),
                               numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
                               numpy_helper.from_array(np.array([1, V], dtype=np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    q = quantize_matmuls(model, Recipe("t", lm_head=WeightFormat(bits=4, block_size=16), lm_head_rescore=9),
                         TensorStore(None))
    everything = all_positions_logits(q)
    hidden = rng.standard_normal((1, T, D)).astype(np.float32)
    run = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = ort.InferenceSession(everything.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"hidden": hidden, "valid": np.array([T], dtype=np.int64)})[0]
    assert rows.shape == (T, V)
    for t in range(T):
        last = run.run(None, {"hidden": hidden, "valid": np.array([t + 1], dtype=np.int64)})[0]
        np.testing.assert_allclose(rows[t], last[0], rtol=1e-5, atol=1e-5)  # MatMulNBits blocks T rows its own way


def test_a_4_bit_head_is_rescored_unless_told_otherwise():
    assert make_recipe("int4").lm_head_rescore == 0 and make_recipe("int4").lm_head.bits == 8
    four = make_recipe("int4", RecipeOptions(lm_head_bits=4))
    assert four.lm_head.bits == 4 and four.lm_head.block_size == LM_HEAD4_BLOCK == 128 and four.lm_head_rescore == 512
    assert four.with_head_block_at_most(64).lm_head.block_size == 64  # a narrow model's head (the CLI lowers it)
    assert four.with_head_block_at_most(640).lm_head == four.lm_head
    given = make_recipe("int4", RecipeOptions(lm_head_bits=4, block_size=32))
    assert given.lm_head.block_size == 32 and given.with_head_block_at_most(640) == given
    assert make_recipe("int4", RecipeOptions(lm_head_bits=4, lm_head_rescore=0)).lm_head_rescore == 0
    assert make_recipe("int8", RecipeOptions(lm_head_bits=4, lm_head_rescore=64)).lm_head_rescore == 64
    assert make_recipe("int4", RecipeOptions(lm_head_bits=32)).lm_head is None
    with pytest.raises(ExportError, match="needs a 4-bit LM head"):
        make_recipe("int4", RecipeOptions(lm_head_rescore=64))
    with pytest.raises(ExportError, match="needs a 4-bit LM head"):
        make_recipe("int4", RecipeOptions(lm_head_bits=4, lm_head_rescore=-1))


@pytest.mark.parametrize("exact_rows", [V, V - 50], ids=["all-rows", "later-rows-not-the-head"])
def test_rows_read_from_the_token_table_inputs(exact_rows):
    """A head tied to the token table reads its int8 rows from graph inputs bound to that table
    (rows x the embedding multiplier c, int8 per row): the same logits as its own int8 copy, and
    candidates at or past `exact_rows` (Gemma 3n's hard-token rows) keep the 4-bit logit."""
    from gemma_export.host_tables import quantize_rows_int8
    from gemma_export.passes.rescore import ROWS_INPUT, SCALES_INPUT
    from gemma_export.recipes import HostRows

    rng = np.random.default_rng(11)
    w = rng.standard_normal((D, V)).astype(np.float32)
    h = rng.standard_normal((1, T, D)).astype(np.float32)
    c = float(np.sqrt(D))
    table_rows, table_scales = quantize_rows_int8(np.ascontiguousarray(w.T) * np.float32(c))
    table_rows[exact_rows:] = 99  # not the head's rows: never used for its logits
    head = WeightFormat(bits=4, block_size=16, accuracy_level=0)
    recipe = Recipe("t", lm_head=head, lm_head_rescore=V // 2, lm_head_rows=HostRows("embed_tokens", c, exact_rows))
    model = quantize_matmuls(_head_graph(w), recipe, TensorStore(None))
    assert {i.name for i in model.graph.input} == {"h", ROWS_INPUT, SCALES_INPUT}
    assert not any("rescore_rows" in t.name for t in model.graph.initializer)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"h": h, ROWS_INPUT: table_rows, SCALES_INPUT: table_scales})[0]
    own = _run(quantize_matmuls(_head_graph(w), dataclasses.replace(recipe, lm_head_rows=None), TensorStore(None)), h)
    approx = _run(_quantized(w, 0), h)
    ids = np.argsort(-approx, axis=-1, kind="stable")[0, :, : V // 2]
    head_rows = np.zeros_like(approx, dtype=bool)
    np.put_along_axis(head_rows[0], ids, ids < exact_rows, axis=-1)
    np.testing.assert_allclose(got[head_rows], own[head_rows], rtol=1e-4, atol=1e-4)  # c rounds a few codes
    assert np.array_equal(got[~head_rows], approx[~head_rows])
    assert head_rows.sum() >= T * min(V // 2, exact_rows) // 2


def test_a_tied_export_binds_the_token_table_as_its_rows(tiny, tmp_path, monkeypatch):
    """`--quant int4 --lm-head 4` on the tied tiny Gemma 3: no int8 copy of the head in
    decoder.data, manifest.table_inputs names the token table's parts, and the runtime (bound
    buffers and plain feeds alike) and eval's all-positions graph give the logits of an export
    whose rows are its own copy."""
    import json

    import gemma_export.plan as plan_module
    from checkpoints import prompt_ids, runtime_logits
    from gemma_export.cli import main as export_main
    from gemma_export.evaluate import _Runner
    from gemma_runtime import Model

    ckpt = tiny.checkpoint("gemma3_sw24")
    args = ["--checkpoint", str(ckpt), "--quant", "int4", "--lm-head", "4", "--max-context", "64", "--prefill-chunk", "8", "--quiet"]
    assert export_main([*args, str(tmp_path / "table")]) == 0
    with monkeypatch.context() as m:
        m.setattr(plan_module, "token_table_rows", lambda *a: None)
        assert export_main([*args, str(tmp_path / "own")]) == 0
    manifest = json.loads((tmp_path / "table" / "manifest.json").read_text())
    assert manifest["provenance"]["quant_recipe"]["lm_head"]["block_size"] == 64  # LM_HEAD4_BLOCK lowered to K = 64
    assert manifest["table_inputs"] == {"lm_head_rows": "embed_tokens.data", "lm_head_row_scales": "embed_tokens.scales"}
    assert "table_inputs" not in json.loads((tmp_path / "own" / "manifest.json").read_text())
    vocab, hidden = manifest["vocab_size"], manifest["hidden_size"]
    saved = (tmp_path / "own" / "decoder.data").stat().st_size - (tmp_path / "table" / "decoder.data").stat().st_size
    assert saved >= vocab * hidden  # the int8 rows (and their scales) are no longer in decoder.data
    prompt = prompt_ids()
    own, own_tokens = runtime_logits(Model.load(tmp_path / "own"), prompt, 8)
    import gemma_runtime.decoder_binding as binding_module

    for io_binding, device in ((True, None), (False, None), (True, "cpu")):
        with monkeypatch.context() as m:
            if device:  # a provider with memory of its own copies the rows once, as an OrtValue there
                m.setitem(binding_module._DEVICE_MEMORY, "CPUExecutionProvider", device)
            model = Model.load(tmp_path / "table", io_binding=io_binding)
        assert (model._binding is not None and model._binding._fixed_on_device is not None) == bool(device)
        got, tokens = runtime_logits(model, prompt, 8)
        assert tokens == own_tokens
        np.testing.assert_allclose(got, own, rtol=1e-3, atol=1e-3 * np.abs(own).max())
    runner = _Runner(tmp_path / "table", threads=1)  # eval's all-positions graph, fed the table too
    for first in range(0, len(prompt), 8):
        rows = runner.chunk_logits(np.asarray(prompt[first:first + 8]), first, 8)
    assert rows.shape == (len(prompt[first:]), vocab)
    np.testing.assert_allclose(rows[-1], own[0], rtol=1e-3, atol=1e-3 * np.abs(own).max())
