"""The vision and audio encoders of a Gemma3nForConditionalGeneration checkpoint, written into the
export folder beside the decoder (package.write_export calls write_encoders):

    vision.onnx + vision.data   pixel_values [1,3,S,S] -> soft_embeddings [1,256,H]   (vision_graph.py)
    audio.onnx + audio.data     input_features [1,F,128] + input_features_mask [1,F] bool
                                -> audio_embeds [1,188,H]                            (audio_graph.py)

and the hard-token rows of embed_tokens.bin: every id of the vision vocabulary
[vision vocab_offset, + vocab_size) and of the audio vocabulary goes through its embedder's hard
path (embedding -> hard norm -> projection -> post-projection norm), UNSCALED: the eager
Gemma3nModel.forward replaces inputs_embeds at those ids with embed_vision/embed_audio(input_ids)
directly (no sqrt(H) factor), so the runtime's one table lookup gives the eager rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gemma_runtime.manifest import GraphSpec, TensorSpec

from .graphs import save_with_external_data
from .progress import Progress
from .weights import TensorSource

VISION_GRAPH, VISION_DATA = "vision.onnx", "vision.data"
AUDIO_GRAPH, AUDIO_DATA = "audio.onnx", "audio.data"


def multimodal_token_ids(config: dict) -> dict[str, int | None]:
    """image/audio placeholder ids and begin/end ids from a Gemma3nConfig config.json."""
    keys = {"image": "image_token_id", "audio": "audio_token_id", "boi": "boi_token_id",
            "eoi": "eoi_token_id", "boa": "boa_token_id", "eoa": "eoa_token_id"}
    return {k: (int(config[v]) if config.get(v) is not None else None) for k, v in keys.items()}


def _image_size(aux_files: dict[str, Path]) -> int:
    path = aux_files.get("preprocessor_config.json")
    if path is None:
        return 768
    size = json.loads(Path(path).read_text(encoding="utf-8")).get("size") or {}
    height, width = size.get("height", 768), size.get("width", 768)
    if height != width:
        from .model.vision import VisionConfigError

        raise VisionConfigError(f"preprocessor_config.json sets a {height}x{width} image; the vision graph is square")
    return int(height)


def _hard_rows(embedding: torch.Tensor, hard_norm, projection: torch.Tensor, post_norm) -> np.ndarray:
    with torch.no_grad():
        return post_norm(hard_norm(embedding.float()) @ projection.float().t()).numpy().astype(np.float32)


def write_encoders(config: dict, tensors: TensorSource, aux_files: dict[str, Path], folder: Path,
                   progress: Progress, kinds: tuple[str, ...] = ("vision", "audio"),
                   ) -> tuple[dict[str, GraphSpec], dict[int, np.ndarray]]:
    """Writes the encoder graphs `kinds` into `folder`; returns (graph specs, embed_tokens overrides:
    first row -> hard-path rows)."""
    from .audio_graph import INPUT_NAMES, OUTPUT_NAMES, export_audio
    from .model.audio import audio_spec_from_config, load_audio_encoder
    from .model.vision import vision_spec_from_config
    from .vision_graph import INPUT, OUTPUT, write_vision
    from .vision_weights import hard_token_rows, load_vision

    graphs, overrides = {}, {}
    if "vision" in kinds:
        vspec = vision_spec_from_config(config, image_size=_image_size(aux_files))
        with progress.step("loading the vision tower"):
            vision = load_vision(vspec, tensors)
        with progress.step(f"exporting {VISION_GRAPH} + {VISION_DATA} (torch.onnx, dynamo)"):
            write_vision(vision, folder)
            del vision
        vision_offset, _ = hard_token_offsets(config)
        overrides[vision_offset] = hard_token_rows(vspec, tensors).numpy().astype(np.float32)
        graphs["vision"] = GraphSpec(
            file=VISION_GRAPH, data_file=VISION_DATA,
            inputs=(TensorSpec(INPUT, "float32", vspec.input_shape),),
            outputs=(TensorSpec(OUTPUT, "float32", vspec.output_shape),))

    if "audio" in kinds:
        aspec = audio_spec_from_config(config)
        with progress.step("loading the audio tower"):
            audio = load_audio_encoder(aspec, tensors)
        with progress.step(f"exporting {AUDIO_GRAPH} + {AUDIO_DATA} (torch.onnx, dynamo)"):
            save_with_external_data(export_audio(audio), folder, AUDIO_GRAPH, AUDIO_DATA)
        e = audio.embedder
        _, audio_offset = hard_token_offsets(config)
        overrides[audio_offset] = _hard_rows(e.embedding.weight, e.hard_embedding_norm, e.embedding_projection.weight,
                                             e.embedding_post_projection_norm)
        del audio
        graphs["audio"] = GraphSpec(
            file=AUDIO_GRAPH, data_file=AUDIO_DATA,
            inputs=(TensorSpec(INPUT_NAMES[0], "float32", aspec.input_shape),
                    TensorSpec(INPUT_NAMES[1], "bool", (1, aspec.num_frames))),
            outputs=(TensorSpec(OUTPUT_NAMES[0], "float32", aspec.output_shape),))
    return graphs, overrides


def hard_token_offsets(config: dict) -> tuple[int, int]:
    """The first token ids of the vision and audio vocabularies, whose embed_tokens rows come from
    the embedders' hard paths rather than the token table (a Gemma 3n config.json)."""
    return (int(config["vision_config"].get("vocab_offset", 262_144)),
            int(config["audio_config"].get("vocab_offset", 262_272)))


ENCODER_FILES = {"vision": (VISION_GRAPH, VISION_DATA), "audio": (AUDIO_GRAPH, AUDIO_DATA)}


def quantized_encoder_files(graphs, recipe) -> set[str]:
    """The files of the encoder graphs in `graphs` (manifest graph specs) that `recipe` rewrites."""
    return {f for kind, spec in graphs.items() if kind in ENCODER_FILES and recipe.encoder_format(kind) is not None
            for f in (spec.file, spec.data_file)}


def quantize_encoders(folder: Path, graphs, recipe, progress: Progress, source: Path | None = None) -> dict:
    """Rewrites the encoder graphs in `folder` under `recipe`'s vision/audio formats (from the
    float files in `source`, default `folder`); returns what provenance records about them:
    {kind: "fp32"} or {kind: {"format", "tensors", "mean_rel_error", "max_rel_error"}}."""
    from .passes import quantize_encoder_files
    from .passes.matmuls import _format_name

    record = {}
    for kind, spec in graphs.items():
        if kind not in ENCODER_FILES:
            continue
        fmt = recipe.encoder_format(kind)
        if fmt is None:
            record[kind] = "fp32"
            continue
        with progress.step(f"quantizing {spec.file} ({_format_name(fmt)} MatMuls, int8 per-channel Conv kernels)"):
            report = quantize_encoder_files(folder, spec.file, spec.data_file, fmt, kind, source=source)
        errors = [r.rel_error for r in report]
        record[kind] = {"format": _format_name(fmt), "conv": "int8/channel/qdq", "tensors": len(report),
                        "mean_rel_error": round(sum(errors) / max(len(errors), 1), 6),
                        "max_rel_error": round(max(errors, default=0.0), 6)}
    return record


def encoder_parameters(config: dict) -> dict[str, int]:
    """Weights of the vision and audio graphs (tower + embedder soft path), from config.json alone
    (the modules built on the meta device): full size about 298M and 685M."""
    from .model.audio import AudioEncoder, audio_spec_from_config
    from .model.vision import VisionEncoder, vision_spec_from_config

    with torch.device("meta"):
        vision = VisionEncoder(vision_spec_from_config(config))
        audio = AudioEncoder(audio_spec_from_config(config))
    return {kind: sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
            for kind, m in (("vision", vision), ("audio", audio))}


# bytes a weight under an 8-bit encoder format: the code, its share of a float32 scale per block of
# 32 (MatMulNBits) or per output channel (Conv), rounded up
_INT8_BYTES = 1.2
_FLOAT_BYTES = 4


def encoder_estimate(config: dict, recipe) -> tuple[int, int]:
    """(bytes on disk at the peak, peak bytes of memory) of writing both encoders under `recipe`.

    Disk: their float32 graphs, or under 8-bit formats the quantized files plus, while one is
    rewritten, its float32 file. Memory: the torch module of one encoder in float32, the exporter's
    copy of its initializers, and the process (torch, transformers, timm): measured 3.2 GiB at the
    peak of the full-size vision export; the audio tower is the larger. The encoders are exported
    one after the other, after the decoder."""
    params = encoder_parameters(config)
    final = {k: n * (_INT8_BYTES if recipe is not None and recipe.encoder_format(k) is not None else _FLOAT_BYTES)
             for k, n in params.items()}
    rewritten = [params[k] * _FLOAT_BYTES for k in params if final[k] != params[k] * _FLOAT_BYTES]
    disk = sum(final.values()) + max(rewritten, default=0)
    memory = 2 * max(params.values()) * _FLOAT_BYTES + (1 << 30)
    return int(disk), int(memory)
