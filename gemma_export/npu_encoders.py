"""The vision and audio encoder graphs of an NPU export (--target qnn-htp): static shapes, standard
ONNX ops at opset 23, QDQ-quantized, every node on the QNN HTP with onnxruntime's CPU fallback off.

    vision.onnx (+ .data)  pixel_values [1,3,S,S] float32 -> soft_embeddings [1,256,H]
                           model/npu_vision.py: model/vision.py's VisionEncoder with RMS norms as
                           RMSNormalization ops and timm's unfused attention
    audio.onnx (+ .data)   input_features [1,F,128] float32, input_features_mask [1,F] float32
                           -> audio_embeds [1,188,H]
                           model/npu_audio.py's NpuAudioEncoder: CumSum, Gather, bool logic and the
                           -3.4e38 attention mask restructured into forms the HTP takes (see there)

    torch module -> torch.onnx.export (opset 23: RMSNormalization; float, in a temporary folder)
      -> calibration feeds: the runtime's own processors (gemma_runtime.image_processing,
         gemma_runtime.audio_features) on media files (calibration_media)
      -> passes/activation_ranges.py: min/max of every tensor over the feeds, segment by segment
         (the full-size vision tower makes 13 GiB of intermediates per image)
      -> onnxruntime's quantizer with its QNN configuration (get_qnn_qdq_config), reading those
         ranges from its calibration cache: int8 symmetric weights, one scale per output channel
         for Conv kernels and for MatMul weights (the configuration's default for MatMul is one
         scale per tensor: the audio tower's cumulative-mean matrix holds 1 .. 1/T in its columns,
         which one int8 grid rounds to zero past t ~ 250; the emulated HTP takes the per-channel
         form), activations uint16 (the target's), their calibrated ranges widened (RANGE_HEADROOM).

Audio length: the graph takes a fixed number of mel frames, F = frames of `audio_seconds` (default
30 s = the feature extractor's limit, F = 2997, the CPU graph's). The runtime computes the 30 s-padded
features as for the CPU graph and feeds their first F frames (identical to padding to F frames:
the front end is frame-local and pads with zeros); a clip with real samples past frame F is refused
with a clear error (gemma_runtime/multimodal.py). Output rows past the clip hold the padding
embedding, as in the CPU graph; with F < 2997 the graph itself appends the rows up to 188.

Kept on the host (runtime, numpy), for every target: image resize/rescale and the log-mel front end
(its FFT); nothing of the encoder graphs themselves.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from gemma_runtime.manifest import GraphSpec, TensorSpec

from .errors import ExportError
from .graphs import save_with_external_data
from .progress import Progress
from .weights import TensorSource

NPU_ENCODER_OPSET = 23  # RMSNormalization (model/npu_norms.py); 16-bit QDQ in the standard domain from 21
VISION_FILE, AUDIO_FILE = "vision.onnx", "audio.onnx"
AUDIO_INPUTS = ("input_features", "input_features_mask")
AUDIO_OUTPUT = "audio_embeds"
SAMPLE_RATE, HOP, FRAME = 16_000, 160, 513  # gemma_runtime.audio_features' front end
AUDIO_SECONDS = 30.0
MEDIA_ENV = "GEMMA_EXPORT_CALIBRATION_MEDIA"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
MAX_MEDIA = 4  # files of each kind read from a calibration folder


def audio_frames(seconds: float) -> int:
    """Mel frames of a clip of `seconds` (the front end's frame count: 513-sample frames every 160)."""
    samples = int(round(seconds * SAMPLE_RATE))
    if samples < FRAME or seconds > AUDIO_SECONDS:
        raise ExportError(f"an audio graph of {seconds} s: choose {FRAME / SAMPLE_RATE:.3f} .. {AUDIO_SECONDS:g} s")
    return (samples - FRAME) // HOP + 1


# ---- calibration media ----------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationMedia:
    """What the encoders' activation ranges are recorded on: image files and audio files, or
    built-in synthetic ones (`synthetic`: a note for the manifest)."""

    images: tuple[Path, ...]
    clips: tuple[Path, ...]
    source: str


def calibration_media(folder: Path | None = None, scratch: Path | None = None) -> CalibrationMedia:
    """The media in `folder` (--calibration-media; default: $GEMMA_EXPORT_CALIBRATION_MEDIA), up to MAX_MEDIA images and
    clips by name; without a folder, a synthetic image and clip written into `scratch` (a smooth
    colour field with edges and noise, a voiced harmonic signal with noise): weaker than real media,
    which a real checkpoint's export should be given."""
    given = "--calibration-media"
    if folder is None and os.environ.get(MEDIA_ENV):
        folder, given = Path(os.environ[MEDIA_ENV]), MEDIA_ENV
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ExportError(f"calibration media folder {folder} does not exist ({given})")
        files = sorted(p for p in folder.iterdir() if p.is_file())
        images = tuple(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_MEDIA]
        clips = tuple(p for p in files if p.suffix.lower() in AUDIO_SUFFIXES)[:MAX_MEDIA]
        if not images or not clips:
            raise ExportError(f"calibration media folder {folder} needs at least one image ({', '.join(IMAGE_SUFFIXES)}) "
                              f"and one audio file ({', '.join(AUDIO_SUFFIXES)})")
        return CalibrationMedia(images, clips, f"{len(images)} image(s), {len(clips)} clip(s) from {folder}")
    if scratch is None:
        raise ExportError("synthetic calibration media need a scratch folder")
    image, clip = synthetic_media(Path(scratch))
    return CalibrationMedia((image,), (clip,), f"built-in synthetic image and clip (no {MEDIA_ENV} given)")


def synthetic_media(folder: Path) -> tuple[Path, Path]:
    """A 640x480 JPEG and a 4 s 16 kHz WAV, deterministic."""
    import soundfile
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:480, 0:640] / 480.0
    rgb = np.stack([0.5 + 0.4 * np.sin(3 * x + 1.3 * y), 0.5 + 0.4 * np.cos(2 * y - x), 0.4 + 0.3 * (x > 0.7) + 0.2 * (y > 0.5)], -1)
    rgb = np.clip(rgb * 255 + rng.normal(0, 10, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "calibration.jpg", quality=90)
    t = np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wave = 0.2 * voiced / np.abs(voiced).max() + 0.01 * rng.standard_normal(t.size)
    soundfile.write(folder / "calibration.wav", wave.astype(np.float32), SAMPLE_RATE, subtype="FLOAT")
    return folder / "calibration.jpg", folder / "calibration.wav"


def vision_feeds(media: CalibrationMedia, preprocessor_folder: Path) -> list[dict[str, np.ndarray]]:
    """pixel_values of each image, by the runtime's ImageProcessor (the checkpoint's config)."""
    from gemma_runtime.image_processing import ImageProcessor

    processor = ImageProcessor.from_folder(preprocessor_folder)
    return [{"pixel_values": processor(path).astype(np.float32)} for path in media.images]


def audio_feeds(media: CalibrationMedia, frames: int) -> list[dict[str, np.ndarray]]:
    """Per clip: its features as the runtime feeds them (the first `frames` of the 30 s-padded
    features, float mask), and the clip repeated to fill the graph, so that every step of the
    cumulative norm and every attention block sees real frames."""
    from gemma_runtime.audio_features import AudioFeatureExtractor, load_audio

    extractor = AudioFeatureExtractor()
    length = (frames - 1) * HOP + FRAME
    feeds = []
    for path in media.clips:
        wave = load_audio(str(path))[: length]
        for w in (wave, np.tile(wave, -(-length // wave.shape[0]))[:length]):
            features, mask = extractor.from_waveform(w, padding="max_length")
            feeds.append({AUDIO_INPUTS[0]: features[:, :frames].astype(np.float32),
                          AUDIO_INPUTS[1]: mask[:, :frames].astype(np.float32)})
    return feeds


# ---- graphs ---------------------------------------------------------------------------------


def export_npu_audio(encoder) -> onnx.ModelProto:
    """model/npu_audio.py's NpuAudioEncoder as a static float graph at NPU_ENCODER_OPSET."""
    spec = encoder.spec
    example = (torch.zeros(spec.input_shape), torch.ones(1, spec.num_frames))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(encoder.eval(), example, input_names=list(AUDIO_INPUTS), output_names=[AUDIO_OUTPUT],
                                    opset_version=NPU_ENCODER_OPSET, dynamo=True, optimize=True, verbose=False)
    return program.model_proto


def per_channel_matmul_weights(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Quantizer overrides: every constant MatMul weight (input B, rank >= 2) int8 symmetric with
    one scale per output column (its last axis)."""
    from onnxruntime.quantization import QuantType

    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) >= 2:
            out[node.input[1]] = [{"axis": len(inits[node.input[1]].dims) - 1, "quant_type": QuantType.QInt8,
                                   "symmetric": True}]
    return out


# Calibrated ranges are widened by this factor (about zero: a tensor that is never negative stays so)
# before the quantizer sees them: min/max over a few files is narrow for unseen media, and a value
# past the range is clipped. uint16 has the steps to spare (one bit of 16 for a factor 2). Measured on
# the tiny audio tower calibrated on the built-in synthetic clip, run on a real 5 s speech WAV, the
# lowest row cosine to fp32 (CPU provider): 0.979 at 1x, 0.9994 at 2x and 3x; HTP vs CPU provider on
# the same graph: 0.99997 at 1x, 0.99986 at 2x, 0.99965 at 3x.
RANGE_HEADROOM = {"uint16": 2.0, "uint8": 1.0}


def widen(ranges: dict[str, tuple], factor: float) -> dict[str, tuple[np.float32, np.float32]]:
    return {n: (np.float32(lo * factor), np.float32(hi * factor)) for n, (lo, hi) in ranges.items()}


def qdq_encoder(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], activations: str = "uint16",
                progress=None) -> dict:
    """Writes `dst` (+ `dst`.data when large), the QDQ graph of the float graph `src`; returns
    {"tensors": ranges recorded, "weights": per-channel weights}."""
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from .passes.activation_ranges import tensor_ranges, write_calibration_cache

    if activations not in ("uint8", "uint16"):
        raise ExportError(f"QDQ activations {activations!r}: choose uint8 or uint16")
    ranges = widen(tensor_ranges(src, feeds, progress=progress), RANGE_HEADROOM[activations])
    model = onnx.load(str(src), load_external_data=False)
    overrides = per_channel_matmul_weights(model)
    large = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    del model
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.calibration-") as tmp:
        cache = write_calibration_cache(ranges, Path(tmp) / "ranges.json")
        config = get_qnn_qdq_config(
            str(src), None, activation_type=QuantType.QUInt16 if activations == "uint16" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True, init_overrides=overrides)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its "consider pre-processing" advice is for CPU CNNs
        try:
            quantize_static(
                str(src), str(dst), None, calibrate_method=config.calibrate_method, quant_format=config.quant_format,
                activation_type=config.activation_type, weight_type=config.weight_type,
                op_types_to_quantize=config.op_types_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                per_channel=config.per_channel, reduce_range=config.reduce_range,
                use_external_data_format=large or config.use_external_data_format,
                extra_options=config.extra_options, calibration_cache_path=str(cache))
        finally:
            root.setLevel(level)
    return {"tensors": len(ranges), "matmul_weights_per_channel": len(overrides)}


def _spec(file: str, folder: Path) -> GraphSpec:
    model = onnx.load(str(folder / file), load_external_data=False)

    def tensors(values):
        return tuple(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                                tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values)

    data = f"{file}.data" if (folder / f"{file}.data").is_file() else None
    return GraphSpec(file=file, data_file=data, inputs=tensors(model.graph.input), outputs=tensors(model.graph.output))


def write_npu_encoders(config: dict, tensors: TensorSource, aux_files: dict[str, Path], folder: Path,
                       progress: Progress, activations: str = "uint16", media: CalibrationMedia | None = None,
                       audio_seconds: float = AUDIO_SECONDS, keep_float: Path | None = None,
                       kinds: tuple[str, ...] = ("vision", "audio")) -> tuple[dict[str, GraphSpec], dict[int, np.ndarray], dict]:
    """Writes the QDQ encoder graphs `kinds` into `folder`; returns (graph specs, embed_tokens
    overrides: first row -> hard-path rows, as encoders.write_encoders, provenance record).
    keep_float: a folder for the float graphs (tests compare them with the CPU graphs)."""
    from .encoders import _hard_rows, _image_size
    from .model.audio import audio_spec_from_config, load_audio_encoder
    from .model.npu_audio import NpuAudioEncoder
    from .model.npu_vision import npu_vision
    from .model.vision import vision_spec_from_config
    from .vision_graph import export_vision
    from .vision_weights import hard_token_rows, load_vision

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graphs, overrides, record = {}, {}, {}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.npu-encoders-") as tmp:
        tmp = Path(tmp)
        if media is None:
            media = calibration_media(scratch=tmp / "media")
        if "vision" in kinds:
            vspec = vision_spec_from_config(config, image_size=_image_size(aux_files))
            with progress.step("loading the vision tower"):
                vision = npu_vision(load_vision(vspec, tensors))
            with progress.step(f"exporting the float vision graph (opset {NPU_ENCODER_OPSET}, static)"):
                save_with_external_data(export_vision(vision, NPU_ENCODER_OPSET), tmp, VISION_FILE, VISION_FILE + ".data")
                del vision
            pre = aux_files.get("preprocessor_config.json")
            pre_folder = Path(pre).parent if pre is not None else tmp  # the processor's defaults without one
            with progress.step(f"QDQ-quantizing {VISION_FILE} (calibration: {media.source})"):
                q = qdq_encoder(tmp / VISION_FILE, folder / VISION_FILE, vision_feeds(media, pre_folder), activations)
            offset = int(config["vision_config"].get("vocab_offset", 262_144))
            overrides[offset] = hard_token_rows(vspec, tensors).numpy().astype(np.float32)
            graphs["vision"] = _spec(VISION_FILE, folder)
            record["vision"] = _record(activations, media, q, image_size=vspec.image_size)
        if "audio" in kinds:
            frames = audio_frames(audio_seconds)
            aspec = audio_spec_from_config(config, num_frames=frames)
            with progress.step("loading the audio tower"):
                audio = load_audio_encoder(aspec, tensors)
            e = audio.embedder
            offset = int(config["audio_config"].get("vocab_offset", 262_272))
            overrides[offset] = _hard_rows(e.embedding.weight, e.hard_embedding_norm, e.embedding_projection.weight,
                                           e.embedding_post_projection_norm)
            with progress.step(f"exporting the float audio graph ({frames} frames = {audio_seconds:g} s, opset "
                               f"{NPU_ENCODER_OPSET}, static)"):
                save_with_external_data(export_npu_audio(NpuAudioEncoder(audio)), tmp, AUDIO_FILE, AUDIO_FILE + ".data")
                del audio
            with progress.step(f"QDQ-quantizing {AUDIO_FILE} (calibration: {media.source})"):
                q = qdq_encoder(tmp / AUDIO_FILE, folder / AUDIO_FILE, audio_feeds(media, frames), activations)
            graphs["audio"] = _spec(AUDIO_FILE, folder)
            record["audio"] = _record(activations, media, q, frames=frames, seconds=audio_seconds,
                                      samples=int(round(audio_seconds * SAMPLE_RATE)))
        if keep_float is not None:
            import shutil

            keep_float.mkdir(parents=True, exist_ok=True)
            for f in tmp.iterdir():
                if f.is_file():
                    shutil.copyfile(f, keep_float / f.name)
    return graphs, overrides, record


def _record(activations: str, media: CalibrationMedia, q: dict, **shape) -> dict:
    return {"format": "qdq", "opset": NPU_ENCODER_OPSET,
            "weights": "int8 symmetric, per output channel (Conv kernels and MatMul weights)",
            "activations": activations, "calibration": media.source, "calibrated_tensors": q["tensors"],
            "on_host": "image resize/rescale, log-mel front end (the runtime's pre-processing, as on every target)",
            **shape}
