"""The vision graph: torch.onnx.export (dynamo) of VisionEncoder, static shapes.

    vision.onnx   pixel_values [1,3,768,768] float32 -> soft_embeddings [1,256,H] float32
    vision.data   its weights (external data; the tower alone is 294M parameters, over protobuf's 2 GB)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from .graphs import OPSET, save_with_external_data
from .model.vision import VisionEncoder

INPUT = "pixel_values"
OUTPUT = "soft_embeddings"
GRAPH_FILE = "vision.onnx"
DATA_FILE = "vision.data"


def export_vision(encoder: VisionEncoder, opset: int = OPSET) -> onnx.ModelProto:
    """The encoder as an optimized ONNX model (weights inside the proto until saved); `opset`: NPU
    targets export at 21 (npu_encoders.py: 16-bit QDQ in the standard domain)."""
    example = torch.zeros(encoder.spec.input_shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            encoder.eval(),
            (example,),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


def write_vision(encoder: VisionEncoder, folder: Path) -> Path:
    """Export and save as vision.onnx + vision.data in `folder`; returns the graph's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_with_external_data(export_vision(encoder), folder, GRAPH_FILE, DATA_FILE)
    return folder / GRAPH_FILE
