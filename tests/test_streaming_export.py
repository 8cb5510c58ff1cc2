"""The streamed decoder export (stream_export.py) against the old path: the whole float model in
torch, torch.onnx.export(optimize=True)'s model_proto saved with external data, then (quantized
recipes) the quantization passes run over those files. Same graph, same tensors, byte for byte."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))
import checkpoints  # noqa: E402

from gemma_export.graphs import export_decoder, save_with_external_data  # noqa: E402
from gemma_export.passes import quantize_decoder_files  # noqa: E402
from gemma_export.recipes import fp32, int4, int8  # noqa: E402
from gemma_export.stream_export import export_streamed, write_decoder  # noqa: E402
from gemma_export.variants import variant_from_config  # noqa: E402
from gemma_export.weights import RandomTensors, load_decoder, table_rows  # noqa: E402

MAX_CONTEXT, CHUNK = 32, 8
CONFIGS = {
    "gemma3": (lambda: checkpoints.gemma3_config(24), "Gemma3ForCausalLM"),
    "gemma3n": (checkpoints.gemma3n_text_config, "Gemma3nForCausalLM"),
}


def _variant(family: str):
    make, arch = CONFIGS[family]
    config = make().to_dict()
    config["architectures"] = [arch]
    return variant_from_config(config)


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _graph(model: onnx.ModelProto) -> tuple:
    """Nodes, inputs and outputs in order; value infos as a set (the optimizer lists the folded
    weights where it folded them, the streamed export before: only the order differs)."""
    g = model.graph
    return ([n.SerializeToString(deterministic=True) for n in g.node], [v.SerializeToString() for v in g.input],
            [v.SerializeToString() for v in g.output], sorted(v.SerializeToString() for v in g.value_info),
            list(model.opset_import))


def _assert_same(old: Path, new: Path) -> None:
    a_model, b_model = onnx.load(str(old / "decoder.onnx")), onnx.load(str(new / "decoder.onnx"))
    assert _graph(b_model) == _graph(a_model)
    a, b = _tensors(a_model), _tensors(b_model)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


class _Exports:
    """Per family, built once: the old path's float export and the streamed decoder."""

    def __init__(self, root: Path):
        self.root, self._built = root, {}

    def get(self, family: str):
        if family not in self._built:
            variant = _variant(family)
            tensors = RandomTensors(variant, seed=3)
            old = self.root / family / "old-fp32"
            old.mkdir(parents=True)
            model = export_decoder(load_decoder(variant, MAX_CONTEXT, tensors), MAX_CONTEXT, CHUNK)
            save_with_external_data(model, old, "decoder.onnx", "decoder.data")
            self._built[family] = (variant, old, export_streamed(variant, MAX_CONTEXT, CHUNK, tensors))
        return self._built[family]

    def new(self, family: str, recipe_name: str) -> Path:
        _, _, streamed = self.get(family)
        folder = self.root / family / f"new-{recipe_name}"
        folder.mkdir()
        write_decoder(streamed, folder, "decoder.onnx", "decoder.data", _RECIPES[recipe_name]())
        return folder

    def old(self, family: str, recipe_name: str) -> Path:
        _, fp32_folder, _ = self.get(family)
        if recipe_name == "fp32":
            return fp32_folder
        folder = self.root / family / f"old-{recipe_name}"
        folder.mkdir()
        quantize_decoder_files(folder, "decoder.onnx", "decoder.data", _RECIPES[recipe_name](), source=fp32_folder)
        return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("streaming"))


_RECIPES = {"fp32": fp32, "int8": int8, "int4": lambda: dataclasses.replace(int4(), calibration=None)}


@pytest.mark.parametrize("recipe", ["fp32", "int4", "int8"])
def test_streamed_decoder_equals_old_path(exports, recipe):
    """fp32: the old export's files; int4/int8: those requantized by the passes (passes/__init__).
    Gemma 3n (E2B's family: per-layer inputs, AltUp, Laurel, KV sharing, tied head); the other
    families were checked the same way when this was written (two torch exports each, so not here)."""
    _assert_same(exports.old("gemma3n", recipe), exports.new("gemma3n", recipe))


def test_streamed_decoder_holds_no_weights(exports):
    """The graph handed to write_decoder references its weights lazily: no float copy inside
    (what the optimizer may fold stays under its input size limit: small norms, rope tables)."""
    variant, _, streamed = exports.get("gemma3n")
    params = sum(p.numel() for p in load_decoder(variant, MAX_CONTEXT, RandomTensors(variant)).parameters())
    lazy = {t.name for t in streamed.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert lazy == set(streamed.weights)
    made = sum(streamed.weights[name]().size for name in lazy)
    assert 0.95 * params < made <= params
    assert max(len(t.raw_data) for t in streamed.model.graph.initializer) <= 4 * 8192


@pytest.mark.parametrize("family", ["gemma3", "gemma3n"])
def test_random_table_rows_equal_whole_table(family):
    """RandomTensors.row_blocks (the host tables' path, never the whole table) equals get()."""
    variant = _variant(family)
    tensors = RandomTensors(variant)
    for name in [n for n in tensors.names() if "embed_tokens" in n]:
        whole = tensors.get(name) * 2.0
        for step in (7, 16, 100, 16384):
            assert torch.equal(torch.cat(list(table_rows(tensors, name, 2.0, step))), whole), (name, step)


def test_safetensors_row_blocks_equal_whole_table(tmp_path):
    """SafetensorsSource.row_blocks (sliced reads) equals get() for the tables (bf16 too)."""
    from gemma_export.checkpoint import open_checkpoint

    ckpt = open_checkpoint(str(checkpoints.build("gemma3n", tmp_path / "ckpt")))
    names = [n for n in ckpt.tensors.names() if "embed_tokens" in n]
    assert len(names) == 2  # embed_tokens and embed_tokens_per_layer
    for name in names:
        whole = ckpt.tensors.get(name) * 3.0
        for step in (7, 64, 16384):
            assert torch.equal(torch.cat(list(table_rows(ckpt.tensors, name, 3.0, step))), whole), (name, step)


def test_lm_head_from_row_blocks_equals_transpose():
    """The LM head filled by row blocks (never holding [V, H] beside [H, V]) is get().t() exactly."""
    from gemma_export.weights import decoder_sources

    variant = _variant("gemma3")  # tied: the head is embed_tokens
    tensors = RandomTensors(variant, seed=5)
    _, sources = decoder_sources(variant, MAX_CONTEXT, tensors)
    assert torch.equal(sources["lm_head_t"](), tensors.get("model.embed_tokens.weight").t())
