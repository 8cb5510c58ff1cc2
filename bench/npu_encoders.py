"""The qnn-htp encoder graphs (gemma_export/npu_encoders.py) on the emulated HTP: size, placement,
QDQ vs fp32, HTP vs CPU provider, emulated seconds (a benchmark, not a test).

    .venv/bin/python bench/npu_encoders.py [--work DIR] [--image photo.jpg] [--audio speech.wav]
        [--segments default|all|NAME,...] [--json REPORT]

Builds into --work (reused when there) the tiny multimodal checkpoint of the tests
(tests/multimodal_checkpoint.py: full-size MobileNetV5 vision tower with seeded random weights, tiny
audio tower), its fp32 CPU-target encoder graphs (encoders.write_encoders) and its qnn-htp encoder
graphs (npu_encoders.write_npu_encoders, calibrated on the built-in synthetic media, never on the
files measured here). Then, on --image and --audio (default /work/cache/media/photo.jpg, speech.wav):

  per graph: nodes, MiB, gemma-export check's placement, HTP graph preparation seconds
  QDQ graph on the CPU provider vs the fp32 CPU graph: cosine mean / min over rows, max |diff|
  HTP vs CPU provider, same QDQ graph: audio whole; vision by segments, since the whole tower is
    436 GMAC and the emulator runs ~0.2 GMAC/s: the QDQ graph cut at block boundaries (the nodes
    between a segment's input tensors and its output, onnx.utils.Extractor), each fed the tensors
    of the CPU provider's run of the whole QDQ graph, so segments do not carry each other's error:
    agreement of the segment output, GMAC, emulated seconds.

Measured 2026-12-01 (a shared 2-core x86-64 machine, onnxruntime 1.32, onnxruntime-qnn 2.7.0, one
intra-op thread; photo.jpg 640x480, speech.wav 5 s; cosine over rows of the last axis, max |diff|
against outputs up to |ref|; the emulator's seconds say how fast it emulates, not how fast an HTP is):

  audio   QDQ 729 nodes (float 233), 3.0 MiB (fp32 0.8 MiB: +2.8 MB of int8 averaging matrices);
          check: every node on QNN (onnxruntime counts 761); QDQ (CPU) vs fp32: cos mean 0.99995,
          min 0.99930, max |diff| 0.117 (|ref| 3.07); HTP prepare 4.9 s, run 1.6 s; HTP vs CPU:
          cos mean 0.99998, min 0.99959, max |diff| 0.065
  vision  QDQ 5320 nodes (float 1588), 285.7 MiB (fp32 1127 MiB); check: every node on QNN
          (onnxruntime counts 4264; 113 s, the HTP's graph preparation); QDQ (CPU, 13.7 s) vs fp32:
          cos mean 0.99769, min 0.99721, max |diff| 0.265 (|ref| 3.33)
  vision, whole, on the HTP (--parts full): prepare 217 s, run 1235 s (436 GMAC, 0.35 GMAC/s);
          HTP vs CPU: cos mean 0.99987, min 0.99983, max |diff| 0.056 (|ref| 3.28)
  vision segments (default), HTP vs CPU given the same inputs:
          stem               0.25 GMAC  QNN_COMMON_ERROR_MEM_ALLOC: its 36 MiB output as a graph
                                        output (the whole graph keeps it inside and runs)
          stage1.uir         4.89 GMAC  15.5 s  cos min 0.99910  max |diff| 0.011 (|ref| 3.06)
          stage2.uir         7.59 GMAC  18.0 s  cos min 0.99942  max |diff| 0.011 (|ref| 3.64)
          stage2.mqa         4.36 GMAC   8.7 s  cos min 0.99985  max |diff| 0.012 (|ref| 7.61)
          stage3.mqa         3.43 GMAC   5.2 s  cos min 0.99773  max |diff| 0.008 (|ref| 3.06)
          stage3.uir         3.77 GMAC   6.1 s  cos min 0.99969  max |diff| 0.007 (|ref| 3.35)
          msfa+embedder     35.14 GMAC  49.1 s  cos min 0.99996  max |diff| 0.031 (|ref| 3.28),
                                        prepare 340 s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny multimodal checkpoint
sys.path.insert(0, str(ROOT / "runtime"))

QNN, CPU = "QNNExecutionProvider", "CPUExecutionProvider"
MEDIA = Path("/work/cache/media")

# (name, first block, last block) over the float graph's module scopes ("tower.blocks.2.9", ...):
# one segment per kind of block and resolution, the fusion adapter and the embedder
DEFAULT_SEGMENTS = (
    ("stem", "tower.conv_stem", "tower.conv_stem"),
    ("stage1.uir", "tower.blocks.1.1", "tower.blocks.1.1"),
    ("stage2.uir", "tower.blocks.2.1", "tower.blocks.2.1"),
    ("stage2.mqa", "tower.blocks.2.9", "tower.blocks.2.9"),
    ("stage3.mqa", "tower.blocks.3.1", "tower.blocks.3.1"),
    ("stage3.uir", "tower.blocks.3.2", "tower.blocks.3.2"),
    ("msfa+embedder", "tower.msfa", "post_norm"),
)


def _scope(node) -> str:
    """The module path of a node (the exporter's name_scopes metadata), blocks to two levels."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            parts = [s.strip(" '") for s in p.value.strip("[]").split(",")]
            parts = [s for s in parts if s]
            if not parts:
                return ""
            if parts[0].startswith("tower.blocks") and len(parts) > 1:
                return parts[1]
            return parts[0]
    return ""


def _macs(model) -> dict[str, float]:
    """Conv / MatMul multiply-accumulates per node output, from shape inference."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.output[0] in shapes:
            out[n.output[0]] = float(np.prod(shapes[n.output[0]]) * np.prod(shapes[n.input[1]][1:]))
        elif n.op_type == "MatMul" and n.output[0] in shapes and n.input[0] in shapes:
            out[n.output[0]] = float(np.prod(shapes[n.output[0]]) * shapes[n.input[0]][-1])
    return out


def vision_segments(float_path: Path, wanted) -> list[dict]:
    """Per segment: its name, input tensors, output tensor and GMAC (from the float graph)."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    scopes = [_scope(n) for n in model.graph.node]
    order = list(dict.fromkeys(scopes))
    macs = _macs(model)
    inits = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    segments = []
    for name, first, last in wanted:
        lo = scopes.index(first)
        hi = len(scopes) - 1 - scopes[::-1].index(last)
        nodes = model.graph.node[lo:hi + 1]
        made = {o for n in nodes for o in n.output}
        inputs = sorted({i for n in nodes for i in n.input if i and i not in made and i not in inits})
        segments.append({"name": name, "inputs": inputs, "output": nodes[-1].output[0],
                         "gmac": sum(macs.get(o, 0.0) for n in nodes for o in n.output) / 1e9,
                         "blocks": order[order.index(first):order.index(last) + 1]})
    return segments


def all_segments(float_path: Path) -> list[tuple[str, str, str]]:
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    order = [s for s in dict.fromkeys(_scope(n) for n in model.graph.node) if s]
    return [(s, s, s) for s in order]


def _session(path, provider: str, **config):
    import onnxruntime as ort

    from gemma_runtime.providers import configure_session

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    for k, v in config.items():
        options.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), options, providers=configure_session(options, provider))


def compare(want: np.ndarray, got: np.ndarray) -> dict:
    a = want.reshape(-1, want.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return {"cos_mean": round(float(cos.mean()), 6), "cos_min": round(float(cos.min()), 6),
            "max_abs": round(float(np.abs(a - b).max()), 5), "ref_max": round(float(np.abs(a).max()), 4)}


def build(work: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, fp32 encoder folder, qnn-htp encoder folder with float/), built when missing."""
    from gemma_export.checkpoint import open_checkpoint
    from gemma_export.encoders import write_encoders
    from gemma_export.npu_encoders import write_npu_encoders
    from gemma_export.progress import Progress

    checkpoint, fp32, npu = work / "checkpoint", work / "fp32", work / "npu"
    if not (checkpoint / "config.json").is_file():
        import multimodal_checkpoint as mc

        mc.build_model().save_pretrained(checkpoint)
        (checkpoint / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "SiglipImageProcessorFast", "do_convert_rgb": None, "do_normalize": False,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}))
    ckpt = open_checkpoint(str(checkpoint))
    progress = Progress(enabled=True)
    if not (fp32 / "audio.onnx").is_file():
        fp32.mkdir(parents=True, exist_ok=True)
        write_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), fp32, progress)
    if not (npu / "audio.onnx").is_file():
        npu.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        _, _, record = write_npu_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), npu, progress,
                                          keep_float=npu / "float")
        (npu / "record.json").write_text(json.dumps({**record, "build_s": round(time.perf_counter() - t, 1)}, indent=1))
    return checkpoint, fp32, npu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/npu-encoders-bench"))
    p.add_argument("--image", type=Path, default=MEDIA / "photo.jpg")
    p.add_argument("--audio", type=Path, default=MEDIA / "speech.wav")
    p.add_argument("--parts", default="audio,vision,segments",
                   help="what to measure, of audio, vision (check, QDQ vs fp32), segments, full (the whole "
                        "vision graph on the HTP: ~0.2 GMAC/s emulated, over half an hour)")
    p.add_argument("--segments", default="default", help="default | all | comma-separated block scopes")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import onnx

    from gemma_export.check import check_graph
    from gemma_export.targets import load_target
    from gemma_runtime.audio_features import audio_features
    from gemma_runtime.image_processing import ImageProcessor

    checkpoint, fp32, npu = build(args.work)
    report: dict = {"build": json.loads((npu / "record.json").read_text())}
    target = load_target("qnn-htp")
    pixels = {"pixel_values": ImageProcessor.from_folder(checkpoint)(args.image).astype(np.float32)}
    features, mask = audio_features(str(args.audio), padding="max_length")
    audio = {"input_features": features, "input_features_mask": mask.astype(np.float32)}
    ref_audio = {"input_features": features, "input_features_mask": mask}

    parts = set(args.parts.split(","))
    for kind, feeds, ref_feeds in (("audio", audio, ref_audio), ("vision", pixels, pixels)):
        if kind not in parts:
            continue
        file = f"{kind}.onnx"
        t = time.perf_counter()
        check = check_graph(npu, kind, file, f"{file}.data", target, ("qnn",))
        row = {"nodes": check.nodes, "float_nodes": len(onnx.load(str(npu / "float" / file), load_external_data=False).graph.node),
               "mib": round(check.bytes / 2**20, 1), "fp32_mib": round(sum(f.stat().st_size for f in fp32.glob(f"{kind}.*")) / 2**20, 1),
               "placement": check.placements[0].nodes, "unsupported": check.unsupported, "check_s": round(time.perf_counter() - t, 1)}
        want = _session(fp32 / file, CPU).run(None, ref_feeds)[0]
        t = time.perf_counter()
        cpu_session = _session(npu / file, CPU)
        cpu = cpu_session.run(None, feeds)[0]
        row["cpu_qdq_s"] = round(time.perf_counter() - t, 1)
        row["qdq_vs_fp32"] = compare(want, cpu)
        if kind == "audio":
            t = time.perf_counter()
            htp_session = _session(npu / file, QNN)
            row["htp_prepare_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            row["htp_vs_cpu"] = compare(cpu, htp_session.run(None, feeds)[0])
            row["htp_run_s"] = round(time.perf_counter() - t, 1)
        report[kind] = row
        print(json.dumps({kind: row}), flush=True)

    if "full" in parts:
        cpu = _session(npu / "vision.onnx", CPU).run(None, pixels)[0]
        t = time.perf_counter()
        htp_session = _session(npu / "vision.onnx", QNN)
        row = {"htp_prepare_s": round(time.perf_counter() - t, 1)}
        t = time.perf_counter()
        htp = htp_session.run(None, pixels)[0]
        row.update(htp_run_s=round(time.perf_counter() - t, 1), htp_vs_cpu=compare(cpu, htp))
        report["vision_full"] = row
        print(json.dumps({"vision_full": row}), flush=True)
    if "segments" not in parts:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0
    # vision by segments
    wanted = (DEFAULT_SEGMENTS if args.segments == "default" else all_segments(npu / "float" / "vision.onnx")
              if args.segments == "all" else [(s, s, s) for s in args.segments.split(",")])
    segments = vision_segments(npu / "float" / "vision.onnx", wanted)
    qdq = onnx.load(str(npu / "vision.onnx"), load_external_data=False)
    boundary = sorted({t for s in segments for t in [*s["inputs"], s["output"]]} - {"pixel_values"})
    have = {o.name for o in qdq.graph.output}
    for name in boundary:
        if name not in have:
            qdq.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = npu / ".probe.onnx"
    onnx.save_model(qdq, str(probe))  # its weights: vision.onnx.data beside it, by reference
    try:
        s = _session(probe, CPU)
        names = [o.name for o in s.get_outputs()]
        values = dict(zip(names, s.run(names, pixels)))
    finally:
        probe.unlink()
    values["pixel_values"] = pixels["pixel_values"]
    report["vision_segments"] = []
    for seg in segments:
        path = npu / f".segment-{seg['name']}.onnx"
        onnx.utils.extract_model(str(npu / "vision.onnx"), str(path), seg["inputs"], [seg["output"]], check_model=False)
        row = {"name": seg["name"], "blocks": len(seg["blocks"]), "gmac": round(seg["gmac"], 2),
               "io_mib": round(sum(values[n].nbytes for n in [*seg["inputs"], seg["output"]]) / 2**20, 1)}
        try:
            feeds = {n: values[n] for n in seg["inputs"]}
            cpu = _session(path, CPU).run(None, feeds)[0]
            t = time.perf_counter()
            htp_session = _session(path, QNN)
            row["htp_prepare_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            htp = htp_session.run(None, feeds)[0]
            run = time.perf_counter() - t
            row.update(htp_run_s=round(run, 1), gmac_per_s=round(seg["gmac"] / run, 3), htp_vs_cpu=compare(cpu, htp))
        except Exception as err:  # onnxruntime's own error types: recorded, the next segment runs
            row["error"] = str(err).splitlines()[0][:300]
        finally:
            for f in npu.glob(f".segment-{seg['name']}.onnx*"):
                f.unlink()
        report["vision_segments"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
