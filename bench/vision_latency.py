"""Vision encoder latency: our vision.onnx (onnxruntime, fp32) against transformers' eager image
path (TimmWrapperModel + Gemma3nMultimodalEmbedder via Gemma3nModel.get_image_features) on the
same weights, in one run; plus export time and graph size (a benchmark, not a test). The int8
encoder of the int8/int4 recipes (passes/encoders.py) is timed in the same run, and its soft
embeddings compared with fp32 by cosine on --image (a real photo, e.g. skimage's chelsea.png) or
on random pixels.

    python bench/vision_latency.py [--checkpoint SRC] [--text-hidden 2048] [--threads 2] [--runs 3] [--keep DIR]
                                   [--image PHOTO]

Measured 2026-12-01 (random weights, random pixels, 2 threads, --runs 2, a shared 2-core machine):
ours fp32 5.92 s per image vs eager 6.79 s (1.15x); int8 7.45 s (runs 8.96 / 5.94: noisy);
max abs diff to eager 3.7e-6 (|ref| max 3.73); vision.data 1138 MiB fp32, 287 MiB int8; int8
soft-embedding cosine to fp32 0.99909 (lowest token 0.99900); export 35 s.

Without --checkpoint the weights are seeded random (full-size MobileNetV5 tower, embedder to a
text hidden size of --text-hidden: 2048 is Gemma 3n E2B's). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_export.model.vision import vision_spec_from_config  # noqa: E402
from gemma_export.vision_graph import DATA_FILE, write_vision  # noqa: E402
from gemma_export.vision_weights import EMBEDDER_PREFIX, RandomVisionTensors, load_vision  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from gemma_runtime.image_processing import ImageProcessor, ImageProcessorConfig  # noqa: E402

# the released Gemma 3n preprocessor_config.json
_PROCESSOR = {"do_convert_rgb": None, "do_normalize": False, "do_rescale": True, "do_resize": True, "resample": 2,
              "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}


def _random_source(text_hidden: int):
    from transformers import Gemma3nConfig

    config = Gemma3nConfig(text_config={"hidden_size": text_hidden, "num_hidden_layers": 2}).to_dict()
    config["architectures"] = ["Gemma3nForConditionalGeneration"]
    return config, RandomVisionTensors(vision_spec_from_config(config), seed=0)


def _eager(config: dict, tensors):
    from transformers import AutoModel, Gemma3nConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nModel, Gemma3nMultimodalEmbedder

    cfg = Gemma3nConfig(**{k: v for k, v in config.items() if k != "architectures"})
    tower = AutoModel.from_config(cfg.vision_config).eval()
    embedder = Gemma3nMultimodalEmbedder(cfg.vision_config, cfg.text_config).eval()
    for module, prefix in ((tower, "model.vision_tower."), (embedder, EMBEDDER_PREFIX)):
        module.load_state_dict({n[len(prefix):]: tensors.get(n).float() for n in tensors.names() if n.startswith(prefix)})
    owner = types.SimpleNamespace(config=cfg, vision_tower=tower, embed_vision=embedder)

    def run(pixels):
        with torch.no_grad():
            return Gemma3nModel.get_image_features(owner, pixels).pooler_output

    return run


def _time(fn, runs: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up (and the first-run cost, reported apart)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a Gemma3nForConditionalGeneration checkpoint (folder or hub id)")
    ap.add_argument("--text-hidden", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write vision.onnx + vision.data here (default: a temp folder)")
    ap.add_argument("--image", type=Path, help="an image file for the int8 vs fp32 cosine (default: random pixels)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        from gemma_export.checkpoint import open_checkpoint

        ckpt = open_checkpoint(args.checkpoint)
        config, tensors = ckpt.config, ckpt.tensors
    else:
        config, tensors = _random_source(args.text_hidden)
    spec = vision_spec_from_config(config)

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        t = time.perf_counter()
        encoder = load_vision(spec, tensors)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        graph = write_vision(encoder, folder)
        export_s = time.perf_counter() - t
        del encoder
        sizes = {"vision.onnx": graph.stat().st_size, DATA_FILE: (folder / DATA_FILE).stat().st_size}
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        t = time.perf_counter()
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        session_s = time.perf_counter() - t
        pixels = np.random.default_rng(0).random(spec.input_shape, dtype=np.float32)
        if args.image:
            pixels = ImageProcessor(ImageProcessorConfig.from_dict(_PROCESSOR))(args.image)
        ours_s, ours_all, ours = _time(lambda: session.run(None, {"pixel_values": pixels})[0], args.runs)
        del session
        int8 = _int8(folder, graph.name, options, pixels, args.runs)

    eager = _eager(config, tensors)
    eager_s, eager_all, ref = _time(lambda: eager(torch.from_numpy(pixels)).numpy(), args.runs)
    print(json.dumps({
        "threads": args.threads, "runs": args.runs, "weights": args.checkpoint or "random",
        "load_s": round(load_s, 2), "export_s": round(export_s, 2), "session_s": round(session_s, 2),
        "ours_ort_fp32_s": round(ours_s, 3), "ours_runs_s": [round(x, 3) for x in ours_all],
        "eager_s": round(eager_s, 3), "eager_runs_s": [round(x, 3) for x in eager_all],
        "speedup": round(eager_s / ours_s, 2), "graph_bytes": sizes,
        "max_abs_diff": float(np.abs(ours - ref).max()), "max_abs_ref": float(np.abs(ref).max()),
        "input": str(args.image or "random pixels"), **_int8_figures(int8, ours),
    }))


def _int8(folder: Path, graph_file: str, options, pixels: np.ndarray, runs: int) -> dict:
    """The int8 recipe's vision graph (written beside the fp32 one), timed on the same pixels."""
    import onnxruntime as ort

    from gemma_export.passes import quantize_encoder_files
    from gemma_export.recipes import ENCODER_W8

    target = folder / "int8"
    target.mkdir(exist_ok=True)
    t = time.perf_counter()
    quantize_encoder_files(target, graph_file, DATA_FILE, ENCODER_W8, "vision", source=folder)
    quant_s = time.perf_counter() - t
    session = ort.InferenceSession(str(target / graph_file), options, providers=["CPUExecutionProvider"])
    median, all_runs, out = _time(lambda: session.run(None, {"pixel_values": pixels})[0], runs)
    return {"quant_s": quant_s, "median": median, "runs": all_runs, "out": out,
            "bytes": {f.name: f.stat().st_size for f in target.iterdir()}}


def _int8_figures(int8: dict, fp32: np.ndarray) -> dict:
    a, b = fp32.reshape(-1, fp32.shape[-1]), int8["out"].reshape(-1, fp32.shape[-1])
    per_token = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"int8_quantize_s": round(int8["quant_s"], 2), "ours_ort_int8_s": round(int8["median"], 3),
            "int8_runs_s": [round(x, 3) for x in int8["runs"]], "int8_graph_bytes": int8["bytes"],
            "int8_cosine": round(float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
            "int8_cosine_min_token": round(float(per_token.min()), 6)}


if __name__ == "__main__":
    main()
