"""Static decoder graphs for NPU targets (qnn-htp): one per chunk length (prefill T, decode 1),
exported from model/npu_text.py's NpuDecoder. The CPU graph (graphs.py) is untouched by this path.

Exported at opset 21: QDQ with 16-bit activations needs QuantizeLinear/DequantizeLinear of opset 21
in the standard domain (onnxruntime's quantizer writes com.microsoft Q/DQ below it, which the QNN
provider also reads, but an NPU graph keeps to the standard domain). Then every RMSNorm becomes one
RMSNormalization node, which raises the graph to opset 23 (passes/rms_norm.py: the HTP computes
the exported x * (mean(x^2) + eps)^-0.5 chain far from the CPU, its own RmsNorm op to one step).
"""

from __future__ import annotations

import warnings

import onnx
import torch

from .graphs import output_names
from .model.npu_text import NpuDecoder, npu_input_names, npu_inputs_spec
from .model.text import TextDecoder
from .passes.rms_norm import fuse_rms_norm
from .variants import Variant

NPU_OPSET = 21


def npu_example_inputs(variant: Variant, max_context: int, chunk: int) -> tuple[torch.Tensor, ...]:
    args = [torch.zeros(1, chunk, variant.hidden_size)]
    if variant.gemma3n:
        args.append(torch.zeros(1, chunk, variant.num_layers, variant.gemma3n.per_layer_dim))
    kinds = npu_inputs_spec(variant, max_context).kinds
    args += [torch.zeros(chunk, variant.head_dim) for _ in kinds for _ in range(2)]
    for kind in kinds:
        args += [torch.zeros(chunk, kind.mask_length), torch.zeros(chunk, chunk)]
    args.append(torch.zeros(1, 1, chunk))
    for layer in variant.cache_layers:
        shape = (1, variant.num_kv_heads, variant.cache_length(layer, max_context), variant.head_dim)
        args += [torch.zeros(shape), torch.zeros(shape)]
    return tuple(args)


def export_npu_decoder(decoder: TextDecoder, max_context: int, chunk: int, fuse_norms: bool = True) -> onnx.ModelProto:
    """The decoder for a fixed chunk length `chunk`, every shape static (weights inside the proto).
    fuse_norms=False keeps each RMSNorm as its chain of standard ops (opset 21): the coreml target,
    whose provider has no RMSNormalization."""
    variant = decoder.variant
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            NpuDecoder(decoder), npu_example_inputs(variant, max_context, chunk),
            input_names=npu_input_names(variant), output_names=output_names(variant),
            opset_version=NPU_OPSET, dynamo=True, optimize=True, verbose=False,
        )
    if not fuse_norms:
        return program.model_proto
    model, _ = fuse_rms_norm(program.model_proto)
    return model
