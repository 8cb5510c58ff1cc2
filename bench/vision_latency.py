"""Vision encoder latency: our vision.onnx (onnxruntime, fp32) against transformers' eager image
path (TimmWrapperModel + Gemma3nMultimodalEmbedder via Gemma3nModel.get_image_features) on the
same weights, in one run; plus export time and graph size (a benchmark, not a test).

    python bench/vision_latency.py [--checkpoint SRC] [--text-hidden 2048] [--threads 2] [--runs 3] [--keep DIR]

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
        ours_s, ours_all, ours = _time(lambda: session.run(None, {"pixel_values": pixels})[0], args.runs)
        del session

    eager = _eager(config, tensors)
    eager_s, eager_all, ref = _time(lambda: eager(torch.from_numpy(pixels)).numpy(), args.runs)
    print(json.dumps({
        "threads": args.threads, "runs": args.runs, "weights": args.checkpoint or "random",
        "load_s": round(load_s, 2), "export_s": round(export_s, 2), "session_s": round(session_s, 2),
        "ours_ort_fp32_s": round(ours_s, 3), "ours_runs_s": [round(x, 3) for x in ours_all],
        "eager_s": round(eager_s, 3), "eager_runs_s": [round(x, 3) for x in eager_all],
        "speedup": round(eager_s / ours_s, 2), "graph_bytes": sizes,
        "max_abs_diff": float(np.abs(ours - ref).max()), "max_abs_ref": float(np.abs(ref).max()),
    }))


if __name__ == "__main__":
    main()
