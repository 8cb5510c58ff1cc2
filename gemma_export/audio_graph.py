"""Export the audio encoder (gemma_export/model/audio.py) as a static-shape ONNX graph.

    input_features      [1, F, 128] float32   log-mel (gemma_runtime.audio_features, padded to 30 s)
    input_features_mask [1, F]      bool      True = real frame
    audio_embeds        [1, 188, H] float32   soft embeddings for the audio placeholder run
"""

from __future__ import annotations

import warnings

import onnx
import torch

from .model.audio import AudioEncoder

OPSET = 18
INPUT_NAMES = ["input_features", "input_features_mask"]
OUTPUT_NAMES = ["audio_embeds"]


def example_inputs(encoder: AudioEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    spec = encoder.spec
    features = torch.zeros(spec.input_shape, dtype=torch.float32)
    mask = torch.zeros((1, spec.num_frames), dtype=torch.bool)
    mask[:, : spec.num_frames // 2] = True
    return features, mask


def export_audio(encoder: AudioEncoder) -> onnx.ModelProto:
    """The encoder as an optimized ONNX model, every shape static (weights inside the proto;
    save with graphs.save_with_external_data: the full-size tower is about 2.7 GB in float32)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            encoder.eval(),
            example_inputs(encoder),
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    return program.model_proto
