"""The decoder graph: torch.onnx.export (dynamo) of the export model, cleaned by onnxscript's optimizer.

One graph serves prefill and decode: its chunk length is the symbolic dimension "T", run with
T = prefill chunk for prefill and T = 1 for decode. One session then holds one copy of the weights
(DESIGN.md: two sessions over one weights file would each prepack their own copy).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from gemma_runtime.manifest import KV_BLOCKS, KV_SHARED_BUFFER, KV_SHARED_WINDOWED

from .model.gqa import CUSTOM_TRANSLATION, layer_windowed_rows
from .model.text import GROUP_QUERY, TWO_BLOCK, TextDecoder
from .variants import Variant

OPSET = 18
CHUNK_DIM = "T"


# manifest kv_layout per attention form (DESIGN.md, KV cache; runtime manifest.CacheSpec): the
# group-query graph's sliding layers keep the op's windowed buffers where the window is shorter
# than the context ("shared_buffer_windowed"), else every buffer is linear ("shared_buffer")


def kv_layout(variant: Variant, max_context: int, attention: str) -> str:
    if attention != GROUP_QUERY:
        return KV_BLOCKS
    windowed = any(layer_windowed_rows(variant, layer, max_context) for layer in variant.cache_layers)
    return KV_SHARED_WINDOWED if windowed else KV_SHARED_BUFFER


def cache_names(layer: int, attention: str = TWO_BLOCK) -> dict[str, str]:
    """Graph names of a cache layer's tensors. The new_key/new_value entries name the outputs:
    the chunk's rows (two-block), or the whole updated buffer (group-query's present)."""
    out = "present" if attention == GROUP_QUERY else "new"
    return {
        "past_key": f"past_key.{layer}",
        "past_value": f"past_value.{layer}",
        "new_key": f"{out}_key.{layer}",
        "new_value": f"{out}_value.{layer}",
    }


def cache_length(variant: Variant, layer: int, max_context: int, attention: str = TWO_BLOCK) -> int:
    """Positions of a layer's cache buffer: a sliding layer's is a ring of the window (two-block)
    or the op's windowed buffer of the window plus slack (group-query, model/gqa.py)."""
    if attention == GROUP_QUERY:
        return layer_windowed_rows(variant, layer, max_context) or max_context
    return variant.cache_length(layer, max_context)


def input_names(variant: Variant) -> list[str]:
    names = ["inputs_embeds"] + (["per_layer_inputs"] if variant.gemma3n else []) + ["position", "valid"]
    for layer in variant.cache_layers:
        names += [cache_names(layer)["past_key"], cache_names(layer)["past_value"]]
    return names


def shared_layers(variant: Variant) -> tuple[int, ...]:
    """Gemma 3n's KV-shared layers: no cache of their own."""
    return tuple(i for i in range(variant.num_layers) if variant.kv_source(i) != i)


def reader_names(layer: int) -> tuple[str, str]:
    """Group-query graphs: the present outputs of KV-shared layer `layer`, which the runtime binds
    to its producer's buffers (manifest CacheSpec.readers)."""
    return f"present_key.{layer}", f"present_value.{layer}"


def output_names(variant: Variant, attention: str = TWO_BLOCK) -> list[str]:
    names = ["logits"]
    for layer in variant.cache_layers:
        names += [cache_names(layer, attention)["new_key"], cache_names(layer, attention)["new_value"]]
    if attention == GROUP_QUERY:
        names += [n for layer in shared_layers(variant) for n in reader_names(layer)]
    return names


class _DecoderGraph(nn.Module):
    """Flat positional signature for the exporter: (embeds, [per_layer], position, valid, *past)."""

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder
        self.has_per_layer = decoder.variant.gemma3n is not None

    def forward(self, *args):
        if self.has_per_layer:
            embeds, per_layer, position, valid, *past = args
        else:
            (embeds, position, valid, *past), per_layer = args, None
        logits, new_rows = self.decoder(embeds, per_layer, position, valid, list(past))
        return (logits, *new_rows)


def example_inputs(variant: Variant, max_context: int, chunk: int, attention: str = TWO_BLOCK) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's shapes (zeros); `chunk` is the example value of T."""
    args = [torch.zeros(1, chunk, variant.hidden_size)]
    if variant.gemma3n:
        args.append(torch.zeros(1, chunk, variant.num_layers, variant.gemma3n.per_layer_dim))
    args += [torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)]
    for layer in variant.cache_layers:
        shape = (1, variant.num_kv_heads, cache_length(variant, layer, max_context, attention), variant.head_dim)
        args += [torch.zeros(shape), torch.zeros(shape)]
    return tuple(args)


def export_decoder(decoder: TextDecoder, max_context: int, prefill_chunk: int) -> onnx.ModelProto:
    """The decoder as an optimized ONNX model (weights inside the proto; package.py writes them
    out as external data)."""
    program = export_program(decoder, max_context, prefill_chunk)
    program.optimize()
    model = program.model_proto
    name_chunk_dim(model)
    return model


def export_program(decoder: TextDecoder, max_context: int, prefill_chunk: int) -> torch.onnx.ONNXProgram:
    """torch.onnx.export (dynamo) of the decoder, not yet optimized: stream_export.py swaps its
    weights for lazy ones before the optimizer runs (`program.optimize()`, as optimize=True does)."""
    variant, attention = decoder.variant, decoder.attention
    args = example_inputs(variant, max_context, min(prefill_chunk, 4) if prefill_chunk > 1 else 2, attention)
    chunk = torch.export.Dim(CHUNK_DIM, min=1, max=max(prefill_chunk, 2))
    dynamic = [{1: chunk}] + ([{1: chunk}] if variant.gemma3n else []) + [None] * (len(args) - 1 - bool(variant.gemma3n))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            _DecoderGraph(decoder),
            args,
            input_names=input_names(variant),
            output_names=output_names(variant, attention),
            dynamic_shapes=(tuple(dynamic),),  # one entry: forward takes *args
            custom_translation_table=CUSTOM_TRANSLATION,
            opset_version=OPSET,
            dynamo=True,
            optimize=False,
            verbose=False,
        )


def name_chunk_dim(model: onnx.ModelProto) -> None:
    """The exporter names the symbolic dimension after its own symbol (s0, ...): call it T."""
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = CHUNK_DIM


def save_with_external_data(model: onnx.ModelProto, folder: Path, graph_file: str, data_file: str) -> None:
    onnx.save_model(
        model,
        str(folder / graph_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
