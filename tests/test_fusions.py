"""Graph passes (passes/fusions.py, passes/graph_passes.py): the fused decoder computes what the
standard-ONNX one does, with fewer nodes and the contrib ops we expect.

The session's tiny exports are built with the cpu target's passes (ort-fusions); the reference is
each family exported once more with `--graph-passes none` (conftest's tiny.export). The cpu target's
Gemma and Gemma 3 graphs also have GroupQueryAttention (rotary inside it, the cache updated in place,
kv_layout "shared_buffer", windowed for sliding layers); Gemma 3n keeps the two-block attention with RotaryEmbedding. Graphs of
different KV layouts take different caches, so those are compared through the runtime.
"""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import checkpoints
from gemma_export.cli import main
from gemma_export.errors import ExportError
from gemma_export.package import requantize_export
from gemma_export.passes.fusions import ort_fusions
from gemma_export.passes.graph_passes import GRAPH_PASSES, apply_graph_passes, parse_graph_passes, passes_for_target
from gemma_export.recipes import fp32, int8

FAMILIES = ("gemma", "gemma3_sw8", "gemma3n")
FUSED = ("SimplifiedLayerNormalization", "com.microsoft:SkipSimplifiedLayerNormalization", "com.microsoft:FastGelu")
DECODE_STEPS = 12
REAL_NEW_TOKENS = 32


def _op_types(folder) -> collections.Counter:
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def _record(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())["provenance"]["graph_passes"]


def _kv_layout(folder) -> str:
    return json.loads((folder / "manifest.json").read_text())["kv_layout"]


def _fused_ops(folder) -> tuple[str, ...]:
    """The contrib ops a fused export must have: rotary is its own op, or inside GroupQueryAttention."""
    attention = "com.microsoft:GroupQueryAttention" if _kv_layout(folder).startswith("shared_buffer") else "com.microsoft:RotaryEmbedding"
    return FUSED + (attention,)


@pytest.fixture(scope="module")
def unfused(tiny):
    """family -> the tiny export with no graph pass (built on first use)."""
    return lambda family: tiny.export(family, graph_passes="none")


@pytest.fixture(scope="module")
def fused_two_block(unfused, tmp_path_factory):
    """family -> the unfused export with the fusions added afterwards (requantize_export): the
    contrib-op fusions on the two-block graph, whose caches are the unfused graph's."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"fused-two-block-{family}")
            requantize_export(unfused(family), made[family], fp32(), graph_passes=("ort-fusions",))
        return made[family]

    return get


def test_cpu_target_layouts(tiny, unfused):
    """GroupQueryAttention for every family (Gemma 3n's KV-shared layers included), two-block unfused."""
    for family, layout in (("gemma", "shared_buffer"), ("gemma3_sw8", "shared_buffer_windowed"),
                           ("gemma3n", "shared_buffer_windowed")):
        assert _kv_layout(tiny.export(family)) == layout, family
        assert _kv_layout(unfused(family)) == "past_and_new_blocks", family


def _feeds(session: ort.InferenceSession, chunk: int, position: int, valid: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((1, chunk, i.shape[2]), dtype=np.float32)
        elif i.name == "per_layer_inputs":
            feeds[i.name] = rng.standard_normal((1, chunk, i.shape[2], i.shape[3]), dtype=np.float32)
        elif i.name == "position":
            feeds[i.name] = np.array([position], dtype=np.int64)
        elif i.name == "valid":
            feeds[i.name] = np.array([valid], dtype=np.int64)
        else:  # past caches
            feeds[i.name] = rng.standard_normal(i.shape, dtype=np.float32) * 0.5
    return feeds


def _close(fused: np.ndarray, plain: np.ndarray, rel: float = 1e-5) -> float:
    err = float(np.abs(fused - plain).max()) / max(1.0, float(np.abs(plain).max()))
    assert err <= rel, f"fused vs unfused: max abs diff {err:.3g} x max(1, |x|max)"
    return err


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graph_is_smaller_with_contrib_ops(tiny, unfused, family):
    fused_ops, plain_ops = _op_types(tiny.export(family)), _op_types(unfused(family))
    assert sum(fused_ops.values()) < sum(plain_ops.values())
    missing = [op for op in _fused_ops(tiny.export(family)) if fused_ops[op] == 0]
    assert not missing, f"{family}: no {missing} after ort-fusions ({dict(fused_ops)})"
    assert not any(":" in op for op in plain_ops), "--graph-passes none must leave standard ONNX only"
    record = _record(tiny.export(family))
    assert record["passes"] == ["ort-fusions"]
    assert record["nodes_after"] == sum(fused_ops.values()) < record["nodes_before"]
    if _kv_layout(tiny.export(family)) == _kv_layout(unfused(family)):  # same graph before the passes
        assert record["nodes_before"] == sum(plain_ops.values())
    assert _record(unfused(family))["passes"] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_outputs_match_unfused(fused_two_block, unfused, family):
    """Every output (logits and new KV rows) of a part-padded prefill chunk and of decode steps at
    positions past the sliding window, on random caches. Graphs of the same KV layout only: the
    GroupQueryAttention ones are compared through the runtime (test_fused_greedy_tokens_match_unfused)."""
    assert _kv_layout(fused_two_block(family)) == _kv_layout(unfused(family))
    assert _op_types(fused_two_block(family))["com.microsoft:RotaryEmbedding"] > 0
    options = ort.SessionOptions()
    options.log_severity_level = 3
    fused = ort.InferenceSession(str(fused_two_block(family) / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(unfused(family) / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    for seed, (chunk, position, valid) in enumerate([(8, 0, 8), (8, 16, 5), (1, 9, 1), (1, 40, 1), (1, 63, 1)]):
        feeds = _feeds(plain, chunk, position, valid, seed)
        for a, b in zip(fused.run(None, feeds), plain.run(None, feeds)):
            _close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_greedy_tokens_match_unfused(tiny, unfused, family):
    from gemma_runtime import Model

    prompt = checkpoints.prompt_ids()
    fused_logits, fused_tokens = checkpoints.runtime_logits(Model.load(tiny.export(family)), prompt, DECODE_STEPS)
    plain_logits, plain_tokens = checkpoints.runtime_logits(Model.load(unfused(family)), prompt, DECODE_STEPS)
    assert fused_tokens == plain_tokens
    _close(fused_logits, plain_logits)


def test_requantized_fused_export_keeps_matmulnbits_and_fusions(tiny, unfused, tmp_path):
    """requantize_export of a fused fp32 export quantizes the same MatMuls as of an unfused one
    (the passes leave them alone) and stays fused; the two int8 graphs compute the same."""
    from gemma_runtime import Model

    fused_int8 = tmp_path / "fused-int8"
    plain_int8 = tmp_path / "plain-int8"
    requantize_export(tiny.export("gemma3_sw8"), fused_int8, int8())
    requantize_export(unfused("gemma3_sw8"), plain_int8, int8())
    ops = _op_types(fused_int8)
    assert ops["com.microsoft:MatMulNBits"] == _op_types(plain_int8)["com.microsoft:MatMulNBits"] > 0
    assert all(ops[op] > 0 for op in _fused_ops(fused_int8)) and _record(fused_int8)["passes"] == ["ort-fusions"]
    prompt = checkpoints.prompt_ids()
    a, ta = checkpoints.runtime_logits(Model.load(fused_int8), prompt, 6)
    b, tb = checkpoints.runtime_logits(Model.load(plain_int8), prompt, 6)
    assert ta == tb
    _close(a, b)


def test_requantize_can_add_passes_but_not_undo_them(tiny, unfused, fused_two_block):
    with pytest.raises(ExportError, match="cannot undo"):
        requantize_export(tiny.export("gemma"), fused_two_block("gemma3n").parent / "x", fp32(), graph_passes=())
    # the passes run on the graph as exported: the attention form stays (GroupQueryAttention is
    # chosen at export time), so the added fusions leave the two-block caches
    fused = fused_two_block("gemma3n")
    record = _record(fused)
    assert record["passes"] == ["ort-fusions"]
    assert record["nodes_after"] == sum(_op_types(fused).values()) < record["nodes_before"] == sum(_op_types(unfused("gemma3n")).values())
    assert _kv_layout(fused) == "past_and_new_blocks" and _op_types(fused)["com.microsoft:GroupQueryAttention"] == 0


def test_passes_are_pure_and_idempotent(unfused):
    folder = unfused("gemma3_sw8")
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    before = model.SerializeToString()
    once, report = ort_fusions(model, folder)
    assert model.SerializeToString() == before, "the pass changed its input"
    assert report.nodes_after == len(once.graph.node) < report.nodes_before == len(model.graph.node)
    twice, again = ort_fusions(once, folder)
    assert again.nodes_after == again.nodes_before and not any(again.fusions.values())


def test_apply_without_passes_leaves_the_file(unfused, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(unfused("gemma"), folder)
    before = (folder / "decoder.onnx").read_bytes()
    record = apply_graph_passes(folder, "decoder.onnx", ())
    assert (folder / "decoder.onnx").read_bytes() == before
    assert record["nodes_before"] == record["nodes_after"] == len(onnx.load(str(folder / "decoder.onnx")).graph.node)


def test_pass_names_are_checked():
    assert parse_graph_passes("none") == ()
    assert parse_graph_passes("ort-fusions") == ("ort-fusions",) and "ort-fusions" in GRAPH_PASSES
    with pytest.raises(ExportError, match="unknown graph pass"):
        parse_graph_passes("ort-fusion")
    with pytest.raises(ExportError, match="contrib ops"):
        passes_for_target("ort-fusions", "qnn-htp")
    assert passes_for_target("none", "qnn-htp") == ()


# ---- real weights --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_pair(real_270m_export, tmp_path_factory):
    """(fused, unfused) fp32 exports of the real Gemma 3 270M: the session's export is one of
    them (fused by default; GEMMA_REAL_270M_EXPORT may name an older unfused one), the other is
    derived (requantize_export adds passes) or exported again with --graph-passes none."""
    base = real_270m_export
    done = json.loads((base / "manifest.json").read_text())["provenance"].get("graph_passes", {}).get("passes", [])
    other = tmp_path_factory.mktemp("real-fusions") / "other"
    if done:
        assert main(["--variant", "gemma3-270m", "--graph-passes", "none", "--quiet", str(other)]) == 0
        yield base, other
    else:
        requantize_export(base, other, fp32(), graph_passes=("ort-fusions",))
        yield other, base
    shutil.rmtree(other.parent, ignore_errors=True)  # 1.7 GB, needed by this module only


def test_real_270m_fused_greedy_matches_unfused(real_pair):
    from gemma_runtime import Model

    fused, plain = real_pair
    assert _op_types(fused)["com.microsoft:GroupQueryAttention"] > 0 and not any(":" in op for op in _op_types(plain))
    model = Model.load(fused)
    prompt = model.encode("Once upon a time, in a small village by the sea,")
    ours = model.generate_ids(prompt, max_new_tokens=REAL_NEW_TOKENS)
    theirs = Model.load(plain).generate_ids(prompt, max_new_tokens=REAL_NEW_TOKENS)
    assert ours == theirs
