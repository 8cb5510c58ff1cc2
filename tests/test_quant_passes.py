"""Quantization passes, exact against numpy: what the graph computes is x @ dequantize(quantize(W)),
with the packed tensors unpacked here from the MatMulNBits spec (not by the exporter's code)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gemma_export.cli import main as export_main
from gemma_export.package import requantize_export
from gemma_export.passes import TensorStore, blockwise, quantize_matmuls
from gemma_export.passes import matmuls
from gemma_export.passes.logits import all_positions_logits
from gemma_export.recipes import Recipe, WeightFormat, make_recipe
from gemma_runtime.prompt_cache import resident_rows

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MAX_CONTEXT, PREFILL_CHUNK  # noqa: E402

# ---- the MatMulNBits layout, written from docs/ContribOperators.md ---------------------------------


def unpack_matmulnbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """W' [K, N] from MatMulNBits' B [N, n_blocks, blob], scales, packed zero points."""
    n_blocks = -(-k // block)
    b = b.reshape(n, n_blocks, -1)
    if bits == 4:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, n_blocks, block)
    else:
        codes = b
    if zp is None:
        zero = np.full((n, n_blocks), 2 ** (bits - 1), dtype=np.float32)
    elif zp.dtype == np.float32:  # zero points of the scales' type: not packed
        zero = zp.reshape(n, n_blocks)
    elif bits == 4:
        per_col = -(-n_blocks // 2)
        z = zp.reshape(n, per_col)
        zero = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)[:, :n_blocks].astype(np.float32)
    else:
        zero = zp.reshape(n, n_blocks).astype(np.float32)
    w = (codes.astype(np.float32) - zero[..., None]) * scales.reshape(n, n_blocks)[..., None]
    return w.reshape(n, -1)[:, :k].T


def graph_weight(q: onnx.ModelProto, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """W' [K, N] that a one-MatMul graph quantized by quantize_matmuls multiplies by: MatMulNBits'
    own weight, plus for affine blocks the offsets' share (block sums S [K, n_blocks] @ O)."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    node = q.graph.node[0]
    zp = inits[node.input[3]] if len(node.input) > 3 else None
    w = unpack_matmulnbits(inits[node.input[1]], inits[node.input[2]], zp, k, n, bits, block)
    if len(q.graph.node) > 1:
        # block sums: Reshape to [1, T, n_blocks, block] + ReduceSum over the block, or (K not a
        # multiple of the block) a MatMul with a 0/1 [K, n_blocks] constant: either way S below
        expected = np.zeros((k, -(-k // block)), dtype=np.float32)
        expected[np.arange(k), np.arange(k) // block] = 1
        by_type = {n.op_type: n for n in q.graph.node[1:]}
        offsets = next(inits[n.input[1]] for n in q.graph.node if n.name.endswith("/offsets/MatMul"))
        if "ReduceSum" in by_type:
            assert k % block == 0
            assert inits[by_type["Reshape"].input[1]].tolist() == [0, 0, k // block, block]
            assert inits[by_type["ReduceSum"].input[1]].tolist() == [-1]
        else:
            sums = next(n for n in q.graph.node if n.name.endswith("/block_sums_b%d/MatMul" % block))
            np.testing.assert_array_equal(inits[sums.input[1]], expected)
        w = w + expected @ offsets
    return w


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'decoder', 'decoder.layers.0.mlp.up_proj', 'linear']")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _mlp_recipe(fmt: WeightFormat) -> Recipe:
    return Recipe("test", mlp=fmt)


@pytest.mark.parametrize("bits, block, symmetric, search, affine, k", [
    (4, 32, True, True, False, 200), (4, 16, False, True, False, 200), (4, 128, True, False, False, 200),
    (4, 64, False, False, False, 200), (4, 32, False, True, True, 200), (4, 16, False, False, True, 200),
    (4, 32, False, True, True, 256), (4, 16, False, False, True, 256),
    (8, 32, True, True, False, 200), (8, 16, False, False, False, 200), (8, 128, True, False, False, 200),
])
def test_matmulnbits_computes_the_dequantized_weight(monkeypatch, bits, block, symmetric, search, affine, k):
    monkeypatch.setattr(matmuls, "SUMS_MATRIX_MAX_BYTES", 0)  # block sums of a K that allows it: ReduceSum
    rng = np.random.default_rng(bits * 1000 + block + k)
    n = 48  # K = 200 is not a multiple of any block: the last block is padded
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, size=(1, n))).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column: scale 0 must not produce NaN
    model = _one_matmul(w)
    fmt = WeightFormat(bits=bits, block_size=block, symmetric=symmetric, accuracy_level=0, scale_search=search, affine=affine)
    q = quantize_matmuls(model, _mlp_recipe(fmt), TensorStore())
    ops = [nd.op_type for nd in q.graph.node]
    # affine: a symmetric MatMulNBits plus the offsets' share, block sums of x times O [n_blocks, N]
    # (the sums by Reshape + ReduceSum where K is a multiple of the block, else a 0/1 MatMul)
    sums = ["Reshape", "ReduceSum"] if k % block == 0 else ["MatMul"]
    assert ops == (["MatMulNBits", *sums, "MatMul", "Add"] if affine else ["MatMulNBits"])
    assert onnx.ModelProto.SerializeToString(model) == onnx.ModelProto.SerializeToString(_one_matmul(w))  # input unchanged
    assert (len(q.graph.node[0].input) > 3) == (not symmetric and not affine)  # packed uint8 zero points
    w_deq = graph_weight(q, k, n, bits, block)
    # the exporter's own dequantize agrees with the spec's (affine: s (q - zp) against
    # s (q - 8) + s (8 - zp), equal up to float rounding)
    own = blockwise.dequantize(blockwise.quantize(w, bits, block, symmetric, search, affine))
    if affine:
        np.testing.assert_allclose(own, w_deq, rtol=0, atol=1e-6 * np.abs(own).max())
    else:
        np.testing.assert_array_equal(own, w_deq)
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    (y,) = _run(q, {"x": x})
    ref = x @ w_deq
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # and the weight error is what 4/8 bits allow
    rel = np.linalg.norm(w - w_deq) / np.linalg.norm(w)
    assert rel < (0.12 if bits == 4 else 0.008)
    assert not np.isnan(w_deq).any() and np.all(w_deq[:, 3] == 0)


@pytest.mark.parametrize("bits, symmetric, affine", [(8, True, False), (4, False, False), (4, False, True)])
def test_a_large_weight_is_cut_into_column_parts(monkeypatch, bits, symmetric, affine):
    """A weight of matmuls.SPLIT_FROM_BYTES or more becomes several MatMulNBits over column ranges joined by
    a Concat (onnxruntime's start-up peak then holds one part twice, not the weight), and the graph
    computes what the uncut one does."""
    from gemma_export.passes import matmuls

    rng = np.random.default_rng(bits)
    k, n = 96, 100
    w = rng.standard_normal((k, n)).astype(np.float32)
    fmt = WeightFormat(bits=bits, block_size=32, symmetric=symmetric, accuracy_level=0, scale_search=True, affine=affine)
    whole = quantize_matmuls(_one_matmul(w), _mlp_recipe(fmt), TensorStore())
    packed = n * (k // 32) * (32 * bits // 8)
    monkeypatch.setattr(matmuls, "SPLIT_FROM_BYTES", packed)
    monkeypatch.setattr(matmuls, "MAX_PART_BYTES", packed // 4)  # 4 parts: 25 columns each
    cut = quantize_matmuls(_one_matmul(w), _mlp_recipe(fmt), TensorStore())
    nbits = [nd for nd in cut.graph.node if nd.op_type == "MatMulNBits"]
    assert [helper.get_attribute_value(a) for nd in nbits for a in nd.attribute if a.name == "N"] == [25, 25, 25, 25]
    assert cut.graph.node[-1].op_type == "Concat" and cut.graph.node[-1].output[0] == "y"
    assert max(numpy_helper.to_array(t).nbytes for t in cut.graph.initializer if "weight_Q" in t.name) <= packed // 4
    monkeypatch.setattr(matmuls, "SPLIT_FROM_BYTES", packed + 1)  # below the threshold: whole
    assert sum(nd.op_type == "MatMulNBits" for nd in quantize_matmuls(_one_matmul(w), _mlp_recipe(fmt), TensorStore()).graph.node) == 1
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    (y_cut,) = _run(cut, {"x": x})
    (y_whole,) = _run(whole, {"x": x})
    np.testing.assert_allclose(y_cut, y_whole, rtol=0, atol=1e-6 * np.abs(y_whole).max())


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_thread_count_is_refused_before_anything_is_written(monkeypatch, tmp_path, capsys, value):
    from gemma_export.cli import main

    monkeypatch.setenv("GEMMA_EXPORT_THREADS", value)
    assert main(["--variant", "gemma3-270m", "--random-weights", "--quiet", str(tmp_path / "out")]) == 2
    assert "GEMMA_EXPORT_THREADS" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scale_search_never_worse_than_round_to_nearest():
    rng = np.random.default_rng(1)
    w = rng.standard_t(4, size=(256, 64)).astype(np.float32)
    for symmetric, affine in ((True, False), (False, False), (False, True)):
        rtn = blockwise.quantize(w, 4, 32, symmetric, search=False, affine=affine).rel_error
        searched = blockwise.quantize(w, 4, 32, symmetric, search=True, affine=affine).rel_error
        assert searched <= rtn * 0.999


@pytest.mark.parametrize("fmt", [WeightFormat(bits=16), WeightFormat(bits=4, symmetric=False, affine=True),
                                 WeightFormat(bits=8)], ids=["fp16", "int4-affine", "int8"])
def test_one_weight_read_by_two_matmuls_gets_unique_node_names(fmt):
    """The tiny Gemma 3n's AltUp router is one initializer that predict and correct both read:
    its quantized nodes must not share names (onnxruntime refuses such a graph)."""
    rng = np.random.default_rng(6)
    k, n = 64, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    scope = "['', 'decoder', 'decoder.layers.0.mlp.up_proj', 'linear']"
    nodes = [helper.make_node("MatMul", [x, "w"], [y], name=f"mm_{x}") for x, y in (("x1", "y1"), ("x2", "y2"))]
    for node in nodes:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scope)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "T", k]) for x in ("x1", "x2")],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "T", n]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(w, "w")])
    q = quantize_matmuls(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), _mlp_recipe(fmt), TensorStore())
    names = [node.name for node in q.graph.node]
    assert len(names) == len(set(names)), names
    x1, x2 = (rng.standard_normal((1, 3, k)).astype(np.float32) for _ in range(2))
    y1, y2 = _run(q, {"x1": x1, "x2": x2})
    tol = 0.02 if fmt.bits == 16 else 0.25
    for y, x in ((y1, x1), (y2, x2)):
        assert np.abs(y - x @ w).max() <= tol * np.abs(x @ w).max()


@pytest.mark.parametrize("fmt", [WeightFormat(bits=16), WeightFormat(bits=4, symmetric=False, affine=True),
                                 WeightFormat(bits=8)], ids=["fp16", "int4-affine", "int8"])
def test_two_weights_of_one_module_get_names_of_their_own(fmt):
    """The exporter can write one parameter as two initializers whose MatMuls carry the same module
    path (full-size Gemma 3n's AltUp modality router: fp16 redeclared its Cast output). Each
    gets its own tensors and nodes; the graph is valid and computes both products."""
    import onnx_ir as ir

    rng = np.random.default_rng(5)
    k, n = 64, 16
    w1, w2 = (rng.standard_normal((k, n)).astype(np.float32) for _ in range(2))
    scope = "['', 'decoder', 'decoder.layers.0.mlp.up_proj', 'linear']"
    nodes = [helper.make_node("MatMul", ["x", w], [y], name=f"mm_{w}") for w, y in (("w1", "y1"), ("w2", "y2"))]
    for node in nodes:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scope)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", k])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "T", n]) for y in ("y1", "y2")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    q = quantize_matmuls(model, _mlp_recipe(fmt), TensorStore())
    outputs = [o for node in q.graph.node for o in node.output]
    assert len(outputs) == len(set(outputs))
    assert len({t.name for t in q.graph.initializer}) == len(q.graph.initializer)
    ir.from_proto(q)  # what the graph passes load it with: refuses a redeclared output
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    y1, y2 = _run(q, {"x": x})
    tol = 0.02 if fmt.bits == 16 else 0.25
    for y, w in ((y1, w1), (y2, w2)):
        assert np.abs(y - x @ w).max() <= tol * np.abs(x @ w).max()
    assert np.abs(y1 - y2).max() > 0.5  # each product its own weight


@pytest.mark.parametrize("bits, symmetric, affine", [(4, False, True), (4, True, False), (4, False, False), (8, True, False)])
def test_weighted_search_graph_computes_the_dequantized_weight(bits, symmetric, affine):
    """With calibration importance the packed weight is still exactly what the graph multiplies by."""
    rng = np.random.default_rng(7 + bits)
    k, n = 200, 40  # a padded last block
    w = rng.standard_normal((k, n)).astype(np.float32)
    imp = rng.exponential(size=k).astype(np.float32) ** 3
    fmt = WeightFormat(bits=bits, block_size=32, symmetric=symmetric, affine=affine)
    q = quantize_matmuls(_one_matmul(w), _mlp_recipe(fmt), TensorStore(), importance={"w": imp})
    w_deq = graph_weight(q, k, n, bits, 32)
    own = blockwise.dequantize(blockwise.quantize(w, bits, 32, symmetric, True, affine, imp))
    np.testing.assert_allclose(own, w_deq, rtol=0, atol=1e-6 * np.abs(own).max() if affine else 0)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    (y,) = _run(q, {"x": x})
    np.testing.assert_allclose(y, x @ w_deq, rtol=1e-5, atol=1e-5 * np.abs(x @ w_deq).max())
    # the weighting changed the choice: the weighted error is lower than the unweighted search's
    plain = blockwise.dequantize(blockwise.quantize(w, bits, 32, symmetric, True, affine))
    werr = lambda d: float((imp[:, None] * (w - d) ** 2).sum())  # noqa: E731
    assert werr(w_deq) < werr(plain)


def test_importance_changes_the_choice():
    """A constructed block: channel 0 carries almost all activation energy. Unweighted, the search
    spreads the error evenly; weighted, it fits channel 0 (nearly) exactly, at a cost elsewhere."""
    rng = np.random.default_rng(3)
    w = rng.uniform(-1, 1, size=(32, 8)).astype(np.float32)
    w[0] = 0.37  # between grid points of the unweighted fit
    imp = np.full(32, 1e-3, np.float32)
    imp[0] = 1e3
    for symmetric, affine in ((False, True), (True, False)):
        plain = blockwise.dequantize(blockwise.quantize(w, 4, 32, symmetric, True, affine))
        weighted = blockwise.dequantize(blockwise.quantize(w, 4, 32, symmetric, True, affine, importance=imp))
        assert not np.array_equal(plain, weighted)
        assert np.abs(weighted[0] - w[0]).sum() < np.abs(plain[0] - w[0]).sum()
        # the plain search is better by its own (unweighted) measure, the weighted one by its own
        assert ((w - plain) ** 2).sum() <= ((w - weighted) ** 2).sum()
        werr = lambda d: float((imp[:, None] * (w - d) ** 2).sum())  # noqa: E731
        assert werr(weighted) < werr(plain)
    # weights of the padded rows are zero, the floor keeps unseen channels above zero
    wts = blockwise.block_weights(np.r_[np.zeros(10), np.ones(10)].astype(np.float32), 20, 16)
    assert wts.shape == (2, 16) and (wts[1, 4:] == 0).all() and (wts[0, :10] == blockwise.IMPORTANCE_FLOOR).all()
    with pytest.raises(ValueError):
        blockwise.block_weights(np.ones(5, np.float32), 20, 16)


def test_calibration_statistics_are_mean_squares():
    """passes/calibrate.py: the extra outputs are each weight MatMul's input, and the importance
    is the mean over valid positions of x^2 per input channel (shared by weights on one input)."""
    from gemma_export.passes import calibrate

    stats = calibrate.InputStats()
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((1, 6, 4)).astype(np.float32), rng.standard_normal((1, 6, 4)).astype(np.float32)
    calibrate.accumulate(stats, {"x": a}, 6)
    calibrate.accumulate(stats, {"x": b}, 2)  # only the first 2 positions are valid
    imp = calibrate.importance(stats, {"x": ["w1", "w2"]})
    ref = (np.concatenate([a[0], b[0, :2]]).astype(np.float64) ** 2).mean(axis=0)
    np.testing.assert_allclose(imp["w1"], ref, rtol=1e-6)
    assert imp["w2"] is imp["w1"]


def test_accuracy_level_4_stays_close():
    """int8 activations (accuracy_level 4) are not exact, but stay within a percent."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    q = quantize_matmuls(_one_matmul(w), _mlp_recipe(WeightFormat(bits=4, accuracy_level=4)), TensorStore())
    x = rng.standard_normal((1, 4, 256)).astype(np.float32)
    (y,) = _run(q, {"x": x})
    ref = x @ blockwise.dequantize(blockwise.quantize(w, 4, 32, True, True))
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_fp16_pass_casts_float16_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    q = quantize_matmuls(_one_matmul(w), _mlp_recipe(WeightFormat(bits=16)), TensorStore())
    assert [nd.op_type for nd in q.graph.node] == ["Cast", "MatMul"]
    assert q.graph.initializer[0].data_type == TensorProto.FLOAT16
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    (y,) = _run(q, {"x": x})
    np.testing.assert_allclose(y, x @ w.astype(np.float16).astype(np.float32), rtol=1e-5, atol=1e-5)


# ---- on tiny exports ------------------------------------------------------------------------------


def _export(tiny, family: str, out: Path, *args: str) -> Path:
    rc = export_main(["--checkpoint", str(tiny.checkpoint(family)), "--max-context", str(MAX_CONTEXT),
                      "--prefill-chunk", str(PREFILL_CHUNK), "--quiet", *args, str(out)])
    assert rc == 0
    return out


def _dequantized_graph(folder: Path) -> onnx.ModelProto:
    """The numpy reference of a quantized decoder: every MatMulNBits replaced by a MatMul of the
    weight unpacked here, every float16 weight by its float32 value."""
    model = onnx.load(str(folder / "decoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, extra = [], []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            arrays = [numpy_helper.to_array(inits[i]) for i in node.input[1:]]
            w = unpack_matmulnbits(arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, a["K"], a["N"], a["bits"], a["block_size"])
            name = node.name + "/dequantized"
            extra.append(numpy_helper.from_array(w.astype(np.float32), name))
            nodes.append(helper.make_node("MatMul", [node.input[0], name], list(node.output)))
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(extra)
    return model


@pytest.mark.parametrize("family, args", [
    ("gemma3_sw24", ["--quant", "int4", "--block-size", "16", "--accuracy-level", "0"]),
    ("gemma3n", ["--quant", "int8", "--asymmetric", "--accuracy-level", "0"]),
])
def test_quantized_decoder_equals_its_dequantized_reference(tiny, tmp_path, family, args):
    out = _export(tiny, family, tmp_path / "q", *args)
    q = onnx.load(str(out / "decoder.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in q.graph.node)
    manifest = json.loads((out / "manifest.json").read_text())
    feeds = _zero_feeds(manifest)
    rng = np.random.default_rng(0)
    for name, value in feeds.items():
        if value.dtype == np.float32:
            feeds[name] = rng.standard_normal(value.shape).astype(np.float32)
    got = _run(q, feeds)
    want = _run(_dequantized_graph(out), feeds)
    # a windowed sliding cache's rows past the resident ones are the op's scratch (unspecified)
    tokens = int(feeds["position"][0]) + PREFILL_CHUNK
    rows = {c["new_key"]: c for c in manifest["caches"]} | {c["new_value"]: c for c in manifest["caches"]}
    names = [o.name for o in q.graph.output]
    for name, g, w in zip(names, got, want):
        spec = rows.get(name)
        if manifest["kv_layout"] == "shared_buffer_windowed" and spec is not None and spec["kind"] == "sliding":
            held = resident_rows(tokens, spec["length"], manifest["sliding_window"])
            g, w = g[:, :, :held], w[:, :, :held]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(w).max())))


def _zero_feeds(manifest: dict) -> dict[str, np.ndarray]:
    spec = manifest["graphs"]["decoder"]["inputs"]
    feeds = {}
    for t in spec:
        shape = [PREFILL_CHUNK if d == "T" else d for d in t["shape"]]
        feeds[t["name"]] = np.zeros(shape, dtype=np.dtype(t["dtype"]))
    feeds["position"][:] = 3
    feeds["valid"][:] = PREFILL_CHUNK - 2
    return feeds


def test_int8_table_lookup_equals_the_dequantized_rows(tiny, tmp_path):
    from gemma_runtime.manifest import read_manifest
    from gemma_runtime.tables import HostTableReader

    fp32 = tiny.export("gemma3n")
    out = requantize_export(fp32, tmp_path / "int4", make_recipe("int4"))
    for name, spec in out.tables.items():
        assert spec.dtype == "int8" and spec.scale_layout == "per_row"
        floats = read_manifest(fp32).tables[name]
        x = np.fromfile(fp32 / floats.file, dtype=np.float32).reshape(floats.shape)
        peak = np.abs(x).max(axis=1)
        scale = (peak / 127).astype(np.float32)
        q = np.clip(np.rint(x / np.where(scale > 0, scale, 1)[:, None]), -127, 127)
        reader = HostTableReader.open(tmp_path / "int4", name, spec)
        ids = np.arange(spec.shape[0])
        np.testing.assert_array_equal(reader.lookup(ids), (q * scale[:, None]).astype(np.float32))


def _int4_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint8 [rows, ceil(cols / 2)], scales, dequantized rows) of float32 rows x, from
    host_tables.py's docstring: q = round(x / s) in [-8, 7], s = -x_p * c / 8 with x_p the row's value
    of largest magnitude and c the first of 1.0, 0.95, ..., 0.5 of least squared error; column 2j in
    the low nibble of byte j, 2j + 1 in its high nibble, two's complement, 0 past an odd end."""
    peak = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    best_err = np.full(len(x), np.inf)
    for c in (1 - 0.05 * i for i in range(11)):
        s = (peak * np.float32(-c / 8)).astype(np.float32)
        q = np.clip(np.rint(x / np.where(s != 0, s, 1)[:, None]), -8, 7)
        err = np.square(q * s[:, None] - x).sum(axis=1)
        if c == 1:
            scale, codes = s, q
        better = err < best_err
        scale, codes, best_err = np.where(better, s, scale), np.where(better[:, None], q, codes), np.where(better, err, best_err)
    nib = np.pad(codes.astype(np.int16) & 0xF, ((0, 0), (0, x.shape[1] % 2)))
    return (nib[:, 0::2] | nib[:, 1::2] << 4).astype(np.uint8), scale, (codes * scale[:, None]).astype(np.float32)


def test_int4_tables_export_runs_as_its_dequantized_tables(tiny, tmp_path):
    """--quant int8 --tables int4 on the tiny Gemma 3n (embed_tokens and per_layer): the files hold
    the numpy reference's bytes, a lookup is its dequantized rows exactly, embed_tokens.bin is about
    half of int8's, and the runtime generates the same ids as the same graphs given float32 tables of
    the dequantized rows."""
    from gemma_runtime import Model
    from gemma_runtime.manifest import read_manifest
    from gemma_runtime.tables import HostTableReader

    family = "gemma3n"
    fp32 = tiny.export(family)
    out = _export(tiny, family, tmp_path / "int4-tables", "--quant", "int8", "--tables", "int4")
    manifest = read_manifest(out)
    assert manifest.provenance["quant_recipe"]["tables"] == "int4"
    floats = tmp_path / "float-tables"  # the same export, its tables float32 rows of the reference
    shutil.copytree(out, floats)
    raw = json.loads((floats / "manifest.json").read_text())
    for name, spec in manifest.tables.items():
        rows, cols = spec.shape
        assert (spec.dtype, spec.scale_layout, spec.row_bytes) == ("int4", "per_row", (cols + 1) // 2)
        x = np.fromfile(fp32 / spec.file, dtype=np.float32).reshape(rows, cols)
        packed, scale, want = _int4_rows(x)
        data = np.fromfile(out / spec.file, dtype=np.uint8)
        np.testing.assert_array_equal(data[: packed.size].reshape(packed.shape), packed)
        np.testing.assert_array_equal(data[spec.scale_offset:].view(np.float32), scale)
        reader = HostTableReader.open(out, name, spec)
        np.testing.assert_array_equal(reader.lookup(np.arange(rows)), want)
        want.tofile(floats / spec.file)
        raw["tables"][name] = {**raw["tables"][name], "dtype": "float32", "scale_layout": None, "scale_dtype": None,
                               "scale_offset": None, "row_bytes": 4 * cols}
        raw["files"][spec.file] = _sha(floats / spec.file)
    (floats / "manifest.json").write_text(json.dumps(raw))
    int8 = requantize_export(fp32, tmp_path / "int8", make_recipe("int8"))
    size4, size8 = ((f / "embed_tokens.bin").stat().st_size for f in (out, tmp_path / "int8"))
    rows, cols = int8.tables["embed_tokens"].shape
    assert size4 == rows * ((cols + 1) // 2) + (-rows * ((cols + 1) // 2) % 64) + 4 * rows
    assert 0.45 < size4 / size8 < (cols / 2 + 4) / cols + 0.01, (size4, size8)
    prompt = [int(i) for i in np.random.default_rng(3).integers(1, manifest.vocab_size, 11)]
    got = Model.load(out).generate_ids(prompt, 12)
    assert len(got) == 12 and got == Model.load(floats).generate_ids(prompt, 12)


@pytest.mark.parametrize("recipe", ["fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("tables", ["float32", "int8", "int4"])
def test_tables_option_applies_to_every_recipe(recipe, tables):
    """--tables is the one recipe option a float recipe takes (int4 as int8 always was); an unknown
    format is refused."""
    assert make_recipe(recipe, _options(tables=tables)).tables == tables


def test_unknown_table_format_is_refused():
    from gemma_export.errors import ExportError

    with pytest.raises(ExportError, match="host table format 'int2'"):
        make_recipe("int8", _options(tables="int2"))


def test_runtime_runs_quantized_exports(tiny, tmp_path):
    from gemma_runtime import Model

    fp32 = tiny.export("gemma3_sw8")
    for recipe in ("int4", "int8", "fp16"):
        requantize_export(fp32, tmp_path / recipe, make_recipe(recipe))
        model = Model.load(tmp_path / recipe)
        assert model.manifest.quant == recipe
        tokens = model.generate_ids([2, 17, 33, 4, 90, 11, 5, 61, 7, 8], max_new_tokens=6)
        assert len(tokens) >= 1 and all(0 <= t < 300 for t in tokens)
    fp16, ref = Model.load(tmp_path / "fp16"), Model.load(fp32)
    assert fp16.generate_ids([2, 17, 33, 4], 12) == ref.generate_ids([2, 17, 33, 4], 12)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tables", ["int8", "int4"])
def test_export_and_requantize_agree(tiny, tmp_path, tables):
    """gemma-export --quant int4 and requantize_export(fp32 export) write the same bytes."""
    direct = _export(tiny, "gemma3_sw24", tmp_path / "direct", "--quant", "int4", "--block-size", "16", "--tables", tables)
    derived = tmp_path / "derived"
    requantize_export(tiny.export("gemma3_sw24"), derived, make_recipe("int4", _options(block_size=16, tables=tables)))
    for f in ("decoder.data", "embed_tokens.bin"):
        assert _sha(direct / f) == _sha(derived / f), f
    layouts = [json.loads((d / "manifest.json").read_text())["tables"]["embed_tokens"] for d in (direct, derived)]
    assert layouts[0] == layouts[1] and layouts[0]["dtype"] == tables
    rec = json.loads((direct / "manifest.json").read_text())["provenance"]["quant_recipe"]
    assert rec["name"] == "int4" and rec["attention"]["bits"] == 8 and rec["mlp"]["bits"] == 4
    assert rec["lm_head"]["bits"] == 8 and rec["lm_head_rescore"] == 0
    assert rec["largest_errors"] and rec["tensors"] > 0


def _options(**kw):
    from gemma_export.recipes import RecipeOptions

    return RecipeOptions(**kw)


@pytest.mark.parametrize("family", ["gemma3_sw24", "gemma3n"])
def test_all_positions_variant_matches_last_position_graph(tiny, family):
    """Row t of the all-positions logits is what the export returns with valid = t + 1."""
    folder = tiny.export(family)
    base = onnx.load(str(folder / "decoder.onnx"))
    variant = all_positions_logits(base)
    manifest = json.loads((folder / "manifest.json").read_text())
    feeds = _zero_feeds(manifest)
    rng = np.random.default_rng(1)
    feeds["inputs_embeds"] = rng.standard_normal(feeds["inputs_embeds"].shape).astype(np.float32)
    if "per_layer_inputs" in feeds:
        feeds["per_layer_inputs"] = rng.standard_normal(feeds["per_layer_inputs"].shape).astype(np.float32)
    feeds["valid"][:] = PREFILL_CHUNK
    all_rows = _run(variant, feeds)[0]
    assert all_rows.shape == (PREFILL_CHUNK, manifest["vocab_size"])
    session = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in (0, 3, PREFILL_CHUNK - 1):
        last = session.run(["logits"], {**feeds, "valid": np.array([t + 1], dtype=np.int64)})[0]
        np.testing.assert_allclose(all_rows[t], last[0], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(last).max())))


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--quant", "int3"], ["--quant int3", "fp32, fp16, int8, int4"]),
    (["--quant", "int4", "--block-size", "48"], ["block size 48"]),
    (["--quant", "fp32", "--block-size", "32"], ["--block-size", "only apply"]),
    (["--quant", "fp16", "--asymmetric"], ["--asymmetric", "only apply"]),
    (["--quant", "int8", "--accuracy-level", "7"], ["accuracy level 7"]),
    (["--quant", "int4", "--lm-head", "5"], ["--lm-head 5"]),
    (["--quant", "int8", "--affine"], ["float zero points", "8-bit"]),
    (["--quant", "int4", "--block-size", "128"], ["block size 128 exceeds K = 64"]),
])
def test_senseless_recipes_are_refused(tiny, tmp_path, capsys, args, words):
    out, ckpt = tmp_path / "out", tiny.checkpoint("gemma")
    capsys.readouterr()
    rc = export_main(["--checkpoint", str(ckpt), "--max-context", str(MAX_CONTEXT), "--prefill-chunk", str(PREFILL_CHUNK),
                      "--quiet", *args, str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gemma-export: error:"), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists()


def test_calibration_collects_every_weight_matmul_input(tiny, tmp_path):
    """evaluate.collect_importance on a tiny fp32 export: an importance [K] for every weight MatMul,
    one array per shared input (q/k/v, gate/up), all positive; requantizing with it is a calibrated
    int4 (the tiny exports have no tokenizer, so the named recipe itself skips calibration and says so)."""
    from gemma_export.evaluate import collect_importance
    from gemma_export.passes import quantize_decoder_files, weight_matmuls

    ref = tiny.export("gemma3_sw24")
    ids = np.random.default_rng(4).integers(3, 300, size=90).tolist()  # > max_context: 2 segments
    imp = collect_importance(ref, ids)
    wms = weight_matmuls(onnx.load(str(ref / "decoder.onnx"), load_external_data=False))
    assert set(imp) == {wm.weight for wm in wms}
    for wm in wms:
        assert imp[wm.weight].shape == (wm.shape[0],) and (imp[wm.weight] > 0).all()
    report = quantize_decoder_files(tmp_path, "decoder.onnx", "decoder.data", make_recipe("int4"), source=ref, importance=imp)
    assert {r.format.split("/")[0] for r in report} == {"int4", "int8"}
    requantize_export(ref, tmp_path / "q", make_recipe("int4"))
    record = json.loads((tmp_path / "q" / "manifest.json").read_text())["provenance"]["quant_recipe"]
    assert record["calibration"] is None and "tokenizer" in record["calibration_skipped"]


def test_a_calibration_serves_only_its_own_export_and_text(tiny, tmp_path):
    """requantize_export(calibration=...) takes calibrate_export's result for the same fp32 export
    and calibration text (the same bytes as calibrating afresh), and refuses one of another export
    or another text before anything is written."""
    import dataclasses

    from gemma_export.errors import ExportError
    from gemma_export.package import calibrate_export

    ref, recipe = tiny.export("gemma3_sw24"), make_recipe("int4")
    calibration = calibrate_export(ref, recipe)
    requantize_export(ref, tmp_path / "given", recipe, calibration=calibration)
    requantize_export(ref, tmp_path / "afresh", recipe)
    assert _sha(tmp_path / "given" / "decoder.data") == _sha(tmp_path / "afresh" / "decoder.data")
    for src, other in [(tiny.export("gemma3_sw8"), recipe), (ref, dataclasses.replace(recipe, calibration_tokens=1024))]:
        with pytest.raises(ExportError, match="calibration given was measured on"):
            requantize_export(src, tmp_path / "refused", other, calibration=calibration)
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("fmt", [WeightFormat(bits=4, symmetric=False, affine=True), WeightFormat(bits=8),
                                 WeightFormat(bits=8, storage="qdq")], ids=["int4-affine", "int8", "int8-qdq"])
def test_weights_of_one_input_become_one_node(fmt):
    """q/k/v (and gate/up) read one input in one format: one MatMulNBits of all their columns and a
    Split, with the codes each weight gets alone, so the products equal the unfused graph's; a
    MatMul of another input stays apart. QDQ weights (NPU targets) are not fused."""
    rng = np.random.default_rng(7)
    k, widths = 64, {"q": 32, "k": 16, "v": 16, "o": 64}
    scopes = {n: f"['', 'decoder', 'decoder.layers.0.self_attn.{n}_proj', 'linear']" for n in widths}
    inputs = {"q": "x", "k": "x", "v": "x", "o": "z"}
    nodes = [helper.make_node("MatMul", [inputs[n], f"w{n}"], [f"y{n}"], name=f"mm_{n}") for n in widths]
    for node, n in zip(nodes, widths):
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes[n])
    ws = {n: rng.standard_normal((k, w)).astype(np.float32) for n, w in widths.items()}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "T", k]) for x in ("x", "z")],
                              [helper.make_tensor_value_info(f"y{n}", TensorProto.FLOAT, [1, "T", w]) for n, w in widths.items()],
                              [numpy_helper.from_array(w, f"w{n}") for n, w in ws.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    recipe = Recipe("test", attention=fmt)
    reports = {True: [], False: []}
    graphs = {fuse: quantize_matmuls(model, recipe, TensorStore(), reports[fuse], fuse_siblings=fuse) for fuse in (True, False)}
    ops = {fuse: [n.op_type for n in g.graph.node] for fuse, g in graphs.items()}
    weight_op = "MatMulNBits" if fmt.storage == "matmulnbits" else "DequantizeLinear"
    assert ops[False].count(weight_op) == 4 and "Split" not in ops[False]
    if fmt.storage == "qdq":
        assert ops[True] == ops[False]
    else:
        assert ops[True].count("MatMulNBits") == 2 and ops[True].count("Split") == 1
    # each weight's own report, the same numbers as unfused
    assert sorted((r.module, r.rel_error) for r in reports[True]) == sorted((r.module, r.rel_error) for r in reports[False])
    feeds = {x: rng.standard_normal((1, 3, k)).astype(np.float32) for x in ("x", "z")}
    fused, apart = _run(graphs[True], feeds), _run(graphs[False], feeds)
    for n, a, b in zip(widths, fused, apart):
        x = feeds[inputs[n]]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
        assert np.abs(a - x @ ws[n]).max() <= 0.25 * np.abs(x @ ws[n]).max()  # and still the product of its own weight
