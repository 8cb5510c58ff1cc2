"""An encoder graph (vision.onnx, audio.onnx) under an 8-bit format, file to file.

Every weight MatMul becomes MatMulNBits (passes/matmuls.py) and every Conv kernel int8 per output
channel behind a DequantizeLinear (passes/convs.py), one tensor at a time, as for the decoder.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import onnx

from ..recipes import Recipe, WeightFormat
from .convs import quantize_convs
from .matmuls import TensorReport, quantize_matmuls, relocate_initializers
from .store import TensorStore


def quantize_encoder_files(folder: Path, graph_file: str, data_file: str, fmt: WeightFormat, kind: str,
                           source: Path | None = None, progress=None) -> list[TensorReport]:
    """Writes `graph_file` + `data_file` into `folder` with 8-bit weights, from the float pair in
    `source` (default: `folder`, rewritten). `kind` ("vision" | "audio") names the tensor class of
    the returned per-tensor errors."""
    folder = Path(folder)
    source = Path(source) if source is not None else folder
    if fmt.bits != 8:
        raise ValueError(f"{kind} encoder: 8-bit weights only, not {fmt.bits}")
    # every MatMul of an encoder takes the encoder's format, whatever its module path says
    recipe = Recipe(kind, attention=fmt, mlp=fmt, lm_head=fmt, other=fmt)
    model = onnx.load(str(source / graph_file), load_external_data=False)
    partial = folder / f"{data_file}.partial"
    report: list[TensorReport] = []
    with TensorStore(base_dir=source, out_file=partial, location=data_file) as store:
        model = quantize_convs(model, store, report, tensor_class=kind, progress=progress)
        # unfused: an encoder runs once per image or clip, where a node's overhead is no matter
        model = quantize_matmuls(model, recipe, store, report, progress, fuse_siblings=False)
        model = relocate_initializers(model, store, store)
    os.replace(partial, folder / data_file)
    onnx.save_model(model, str(folder / graph_file))
    return [dataclasses.replace(r, tensor_class=kind) for r in report]
