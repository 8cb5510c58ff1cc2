"""Passes over the exported ONNX models: pure functions ModelProto -> ModelProto that read and
write big tensors through a TensorStore (passes/store.py), composed by recipes (recipes.py).

- matmuls.quantize_matmuls: weight MatMuls -> MatMulNBits (int4/int8, block-wise) or float16 storage
- logits.all_positions_logits: the decoder with logits for every chunk position (evaluation)
- blockwise: the numpy arithmetic of MatMulNBits (quantize, pack, dequantize)
- calibrate: per-input-channel mean x^2 of every weight MatMul on calibration text (imatrix)
- convs.quantize_convs: Conv kernels -> int8 per output channel + DequantizeLinear (encoders)
- encoders.quantize_encoder_files: vision.onnx / audio.onnx with 8-bit weights, file to file
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..recipes import Recipe
from .encoders import quantize_encoder_files
from .matmuls import TensorReport, quantize_matmuls, relocate_initializers, weight_matmuls
from .store import TensorStore

__all__ = ["TensorReport", "TensorStore", "quantize_decoder_files", "quantize_encoder_files", "quantize_matmuls", "weight_matmuls"]


def quantize_decoder_files(folder: Path, graph_file: str, data_file: str, recipe: Recipe,
                           progress=None, source: Path | None = None, importance=None) -> list[TensorReport]:
    """Writes `graph_file` + `data_file` into `folder` under `recipe`, from the float pair in
    `source` (default: `folder` itself, rewritten), one weight at a time: the graph is loaded
    without its data, each weight is read from the old data file, quantized and appended to the
    new one; the float tensors left are copied after. Returns per-tensor errors."""
    folder = Path(folder)
    source = Path(source) if source is not None else folder
    model = onnx.load(str(source / graph_file), load_external_data=False)
    partial = folder / f"{data_file}.partial"
    report: list[TensorReport] = []
    with TensorStore(base_dir=source, out_file=partial, location=data_file) as store:
        model = quantize_matmuls(model, recipe, store, report, progress, importance)
        model = relocate_initializers(model, store, store)
    os.replace(partial, folder / data_file)
    onnx.save_model(model, str(folder / graph_file))
    return report
