"""The decoder exported without ever holding the float model (issue 6): graph first, weights after.

1. torch.onnx.export runs on the export model whose parameters are zero-stride views of one
   element (shape and dtype right, no storage): the graph is traced, no weight is read.
2. The graph's parameter initializers become lazy tensors (onnx_ir.LazyTensor) that make their
   value from the checkpoint when asked (weights.decoder_sources: norm shift, lm_head transpose).
   The exporter leaves each nn.Linear weight behind a Transpose that the optimizer would fold by
   computing it (holding every transposed weight at once): that fold is done here first, lazily,
   under the optimizer's own name and condition (a Transpose that is its weight's only consumer).
3. The optimizer runs as `torch.onnx.export(optimize=True)` runs it (program.optimize()); the
   lazy initializers come out of the model proto as external references to `LAZY`.
4. write_decoder writes the data file one tensor at a time through a TensorStore whose reads of
   `LAZY` tensors call their maker: the same passes as requantizing a float export
   (passes.matmuls.quantize_matmuls, relocate_initializers), so an int4 export never writes
   float weights and holds one float tensor plus its quantized form at a time.

The float result equals the old path (whole model in torch, model_proto, onnx.save_model) tensor
for tensor; tests/test_streaming_export.py checks that and the int4 result against requantizing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from .graphs import export_program, name_chunk_dim
from .model.text import TWO_BLOCK
from .passes.matmuls import TensorReport, quantize_matmuls, relocate_initializers
from .passes.store import TensorStore
from .recipes import Recipe
from .variants import Variant
from .weights import decoder_sources

LAZY = "<lazy:checkpoint>"  # external-data location of initializers made on demand
_PARAM_PREFIX = "decoder."
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"  # graphs._DecoderGraph holds the TextDecoder as .decoder

Maker = Callable[[], np.ndarray]


@dataclass(frozen=True)
class StreamedDecoder:
    """The optimized decoder graph whose big initializers are external references to LAZY, and
    for each of them (by initializer name) the function that makes its float32 value."""

    model: onnx.ModelProto
    weights: dict[str, Maker]


def _placeholder(shape: torch.Size, dtype: torch.dtype) -> nn.Parameter:
    """A parameter of this shape backed by one element (zero strides): traceable, no storage."""
    return nn.Parameter(torch.zeros((), dtype=dtype).expand(shape), requires_grad=False)


def _numpy_maker(make: Callable[[], torch.Tensor]) -> Maker:
    return lambda: make().detach().numpy()


def _transposed(make: Maker, perm: tuple[int, ...]) -> Maker:
    # C order, as the optimizer's folded np.transpose is serialized
    return lambda: np.ascontiguousarray(np.transpose(make(), perm))


def _lazy(make: Maker, value: ir.Value) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(make()), dtype=value.dtype, shape=value.shape, name=value.name)


def _fold_weight_transposes(graph: ir.Graph, makers: dict[str, Maker]) -> None:
    """Transpose(W) whose input W is a lazy weight used by that node alone -> a lazy initializer
    named as the Transpose's output (what the optimizer's fold produces, without computing it)."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        (source,) = node.inputs
        if source is None or source.name not in makers or len(source.uses()) != 1:
            continue
        out = node.outputs[0]
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(len(source.shape))))
        make = _transposed(makers[source.name], perm)
        folded = ir.Value(name=out.name, shape=ir.Shape([source.shape[p] for p in perm]), type=ir.TensorType(source.dtype))
        folded.const_value = _lazy(make, folded)
        # what the optimizer records on a folded value (FoldConstantsPass._record_contributing_values)
        folded.meta[_FOLDED_FROM] = {source.name}
        folded.metadata_props[_FOLDED_FROM] = repr([source.name])
        graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        makers[out.name] = make
        del makers[source.name]


def _detach_lazy(model: ir.Model, makers: dict[str, Maker]) -> dict[str, Maker]:
    """Every initializer still lazy after the optimizer -> an external reference to LAZY (so the
    proto holds no weight); returns their makers by initializer name."""
    out = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.LazyTensor):
            continue
        if name not in makers:
            raise AssertionError(f"initializer {name} is lazy but has no maker (the optimizer renamed a weight?)")
        out[name] = makers[name]
        value.const_value = ir.ExternalTensor(LAZY, None, None, tensor.dtype, shape=tensor.shape, name=name)
    return out


def export_streamed(variant: Variant, max_context: int, prefill_chunk: int, tensors,
                    attention: str = TWO_BLOCK) -> StreamedDecoder:
    """The decoder graph of `variant` with its weights left in `tensors` (a TensorSource)."""
    model, sources = decoder_sources(variant, max_context, tensors, attention)
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[attr] = _placeholder(param.shape, param.dtype)
    program = export_program(model, max_context, prefill_chunk)
    graph = program.model.graph
    makers: dict[str, Maker] = {}
    for param_name, make in sources.items():
        value = graph.initializers.get(_PARAM_PREFIX + param_name)
        if value is None:
            raise AssertionError(f"parameter {param_name} is not an initializer of the exported graph")
        makers[value.name] = _numpy_maker(make)
        value.const_value = _lazy(makers[value.name], value)
    _fold_weight_transposes(graph, makers)
    program.optimize()
    weights = _detach_lazy(program.model, makers)
    proto = program.model_proto
    name_chunk_dim(proto)
    return StreamedDecoder(proto, weights)


class _LazyStore(TensorStore):
    """A TensorStore whose reads of LAZY initializers make them from the checkpoint."""

    def __init__(self, weights: dict[str, Maker], out_file: Path, location: str, progress=None):
        super().__init__(base_dir=None, out_file=out_file, location=location)
        self._weights = weights
        self._progress = progress

    def read(self, t: onnx.TensorProto) -> np.ndarray:
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if t.data_location != onnx.TensorProto.EXTERNAL or location != LAZY:
            return super().read(t)
        array = np.asarray(self._weights[t.name](), dtype=np.float32)
        if array.shape != tuple(t.dims):
            raise AssertionError(f"initializer {t.name}: made {array.shape}, the graph expects {tuple(t.dims)}")
        if self._progress is not None:
            self._progress(t.name)
        return array


def write_decoder(decoder: StreamedDecoder, folder: Path, graph_file: str, data_file: str, recipe: Recipe,
                  progress=None) -> list[TensorReport]:
    """`graph_file` + `data_file` in `folder` under `recipe`, one weight made, (quantized,) written
    and dropped at a time. Returns per-tensor errors of the quantized weights."""
    folder = Path(folder)
    partial = folder / f"{data_file}.partial"
    report: list[TensorReport] = []
    with _LazyStore(decoder.weights, partial, data_file, progress) as store:
        model = decoder.model
        if recipe.changes_graph:
            model = quantize_matmuls(model, recipe, store, report)
        model = relocate_initializers(model, store, store)
    leftover = [t.name for t in model.graph.initializer if any(e.value == LAZY for e in t.external_data)]
    if leftover:
        raise AssertionError(f"initializers not written: {leftover[:4]}")
    os.replace(partial, folder / data_file)
    onnx.save_model(model, str(folder / graph_file))
    return report
