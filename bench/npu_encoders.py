"""The qnn-htp encoder graphs (gemma_export/npu_encoders.py) on the emulated HTP: size, placement,
QDQ vs fp32, HTP vs CPU provider, emulated seconds (a benchmark, not a test).

    .venv/bin/python bench/npu_encoders.py [--work DIR] [--image photo.jpg] [--audio speech.wav]
        [--parts audio,audio-layers,vision,segments,full] [--segments default|all|NAME,...]
        [--checkpoint CKPT] [--audio-seconds S] [--json REPORT]
    # the full-size audio tower (the 12-layer 1536-wide USM conformer of E2B), on a 5 s graph:
    .venv/bin/python bench/full_encoders_checkpoint.py /work/cache/mm-fullenc-hf --layers 4
    .venv/bin/python bench/npu_encoders.py --work /work/cache/audio-htp/work \
        --checkpoint /work/cache/mm-fullenc-hf --parts audio,audio-layers --audio-seconds 5

Builds into --work (reused when there) the tiny multimodal checkpoint of the tests
(tests/multimodal_checkpoint.py: full-size MobileNetV5 vision tower with seeded random weights, tiny
audio tower), or takes --checkpoint's, its fp32 CPU-target encoder graphs (encoders.write_encoders)
and its qnn-htp encoder graphs (npu_encoders.write_npu_encoders, calibrated on the built-in synthetic
media, never on the files measured here; the audio graph --audio-seconds long, 30 s by default),
only the kinds --parts needs. Then, on --image and --audio (default /work/cache/media/photo.jpg,
speech.wav; a missing --audio is replaced by speech_like's synthetic clip, and said so):

  per graph: nodes, MiB, gemma-export check's placement, HTP graph preparation seconds
  QDQ graph on the CPU provider vs the fp32 CPU graph: cosine mean / min over rows, max |diff|
  HTP vs CPU provider, same QDQ graph: audio whole; vision by segments, since the whole tower is
    436 GMAC and the emulator runs ~0.2 GMAC/s: the QDQ graph cut at block boundaries (the nodes
    between a segment's input tensors and its output, onnx.utils.Extractor), each fed the tensors
    of the CPU provider's run of the whole QDQ graph, so segments do not carry each other's error:
    agreement of the segment output (its DequantizeLinear: a segment that ends in a node unit's
    float output leaves it unquantized, which the HTP failed to finalize, QNN_COMMON_ERROR_MEM_ALLOC),
    GMAC, emulated seconds; audio-layers: the same for the audio graph's sub-sampling, each
    conformer layer and the embedder.
  audio: agreement over all 188 rows and over the clip's rows only (the rest is the padding
    embedding in every graph, equal by construction).

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

Measured 2026-12-02, the full-size audio tower (bench/full_encoders_checkpoint.py --layers 4: E2B's
12-layer 1536-wide USM conformer and its embedder, 681M + 3.3M parameters, transformers' seeded
initialization; --checkpoint, --parts audio,audio-layers), same machine and versions, shared with
another engineer's jobs (load 2-7); no real recording here: speech_like's 4.9 s clip. Calibrated on
the built-in synthetic clip; built in 131 s (30 s graph) and 82 s (5 s graph), audio only.

  audio 30 s  QDQ 3508 nodes (float 1129), 659 MiB (fp32 2616 MiB); check: every node on QNN
          (onnxruntime counts 3681; 454 s, the HTP's graph preparation); 492 GMAC; QDQ (CPU, 6.0 s)
          vs fp32: cos mean 0.99983, min 0.99850, max |diff| 0.198 (|ref| 4.03), the clip's 31 rows
          alone mean 0.99897; HTP prepare 384 s, run 603 s (0.82 GMAC/s: the MatMul-heavy conformer
          emulates 2.3x faster than the vision tower's 0.35); HTP vs CPU: cos mean 0.99992, min
          0.99814, max |diff| 0.204 (|ref| 4.03), clip rows mean 0.99950; HTP vs fp32, clip rows:
          mean 0.99862, min 0.99749, max |diff| 0.251
  audio 5 s   (--audio-seconds 5, 497 frames) 3514 nodes, 657 MiB, every node on QNN (3688; 44 s);
          82 GMAC; QDQ vs fp32, clip rows: cos mean 0.99893, min 0.99827, max |diff| 0.215; HTP
          prepare 48 s, run 100 s (0.82 GMAC/s); HTP vs CPU: cos mean 0.99991, min 0.99823, max
          |diff| 0.187 (clip rows mean 0.99947): the 30 s graph's figures, at a sixth of the cost
  audio-layers (5 s graph), HTP vs CPU given the same inputs:
          sscp               0.36 GMAC   0.7 s  cos min 0.99946  max |diff| 0.052 (|ref| 6.61)
          conformer.0..11    6.80 GMAC each, 7.3-8.7 s, prepare 1.5-1.9 s: cos min 0.99981-0.99989,
                                        max |diff| 0.055-0.075 (|ref| 3.7-5.1)
          embedder           0.10 GMAC   0.2 s  cos min 0.99998  max |diff| 0.025 (|ref| 4.03)
          no layer stands out: the whole graph's min 0.9982 looks like twelve layers' rounding adding up
  tiny tower, same clip, 5 s graph: HTP vs CPU cos min 0.99876, QDQ vs fp32 min 0.99836 (0.99959 and
          0.99930 on 2026-12-01's real speech.wav, 30 s graph): the lower floors come with the clip
          more than with the size.
  vision stem segment, now cut at its DequantizeLinear (--parts segments, on the tests' gradient
          JPEG: no photo.jpg here): runs, 0.25 GMAC, 4.5 s, cos min 0.99910, max |diff| 0.022
          (|ref| 2.94): 2026-12-01's MEM_ALLOC was the float-ended segment, not its output's size
  Nothing of the full-size graph was refused. onnxruntime may log "Unsupported nodes in QNN EP:
  node_mean (ReduceMean), node_sub (Sub), ..., Transpose_token_N" (the cumulative norms' first
  ReduceMean and Sub, transposes of its NHWC layout pass; seen for the full tower's 5 s and 30 s
  graphs and the tiny tower's 5 s graph, not on every run, with the CPU fallback on or off): an
  intermediate partitioning pass; every node still lands on QNN and the fallback-off sessions build
  and run.
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


def _segment(model, lo: int, hi: int, macs: dict, name: str, blocks: list) -> dict:
    """Nodes [lo, hi] of `model`: the tensors they read from outside (not weights), the last
    node's output, GMAC."""
    inits = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    nodes = model.graph.node[lo:hi + 1]
    made = {o for n in nodes for o in n.output}
    inputs = sorted({i for n in nodes for i in n.input if i and i not in made and i not in inits})
    return {"name": name, "inputs": inputs, "output": nodes[-1].output[0],
            "gmac": sum(macs.get(o, 0.0) for n in nodes for o in n.output) / 1e9, "blocks": blocks}


def vision_segments(float_path: Path, wanted) -> list[dict]:
    """Per segment: its name, input tensors, output tensor and GMAC (from the float graph)."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    scopes = [_scope(n) for n in model.graph.node]
    order = list(dict.fromkeys(scopes))
    macs = _macs(model)
    segments = []
    for name, first, last in wanted:
        lo = scopes.index(first)
        hi = len(scopes) - 1 - scopes[::-1].index(last)
        segments.append(_segment(model, lo, hi, macs, name, order[order.index(first):order.index(last) + 1]))
    return segments


def audio_segments(float_path: Path) -> list[dict]:
    """The audio graph (model/npu_audio.py) cut into the sub-sampling convolutions and input
    projection, each conformer layer (from its first FFW to its last norm: the frame and attention
    masks, made once before layer 0, come in as inputs) and the embedder (the rest)."""
    import onnx

    model = onnx.load(str(float_path), load_external_data=False)
    scopes = [_scope(n) for n in model.graph.node]
    macs = _macs(model)
    last = lambda prefix: max(i for i, s in enumerate(scopes) if s.startswith(prefix))
    first = lambda prefix: min(i for i, s in enumerate(scopes) if s.startswith(prefix))
    segments = [_segment(model, 0, last("encoder.tower.subsample_conv_projection.input_proj_linear"), macs, "sscp", [])]
    layer = 0
    while any(s.startswith(f"encoder.tower.conformer.{layer}.") for s in scopes):
        prefix = f"encoder.tower.conformer.{layer}."
        segments.append(_segment(model, first(prefix), last(prefix + "norm"), macs, f"conformer.{layer}", [prefix]))
        layer += 1
    segments.append(_segment(model, last(f"encoder.tower.conformer.{layer - 1}.norm") + 1, len(scopes) - 1, macs,
                             "embedder", []))
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


def _resonator(x: np.ndarray, freq: np.ndarray, rate: int) -> np.ndarray:
    """A two-pole resonance at `freq` (Hz, per sample: it may glide), bandwidth 60 Hz + freq / 20."""
    r = np.exp(-np.pi * (60 + freq / 20) / rate)
    a1, a2 = 2 * r * np.cos(2 * np.pi * freq / rate), -r * r
    y, y1, y2 = np.zeros_like(x), 0.0, 0.0
    for i in range(x.size):
        y1, y2 = (1 - r[i]) * x[i] + a1[i] * y1 + a2[i] * y2, y1
        y[i] = y1
    return y


def speech_like(path: Path, seconds: float = 4.9) -> Path:
    """A deterministic speech-like 16 kHz WAV (4.9 s: it fits a 5 s audio graph's 497 frames), for
    machines without a real recording: syllables of 0.14-0.28 s, each a glottal pulse train (pitch
    95-160 Hz, with vibrato) through three formant resonators gliding from one vowel to another, some
    after a noise burst (a fricative), and pauses between words. Weaker than real speech, which
    --audio should be given where there is some."""
    import soundfile

    rate, rng = 16_000, np.random.default_rng(5)
    vowels = np.array([(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (300, 870, 2240), (570, 840, 2410)], float)
    pieces, total = [], 0
    while total < seconds * rate:
        if rng.random() < 0.2:  # a pause between words
            pieces.append(0.002 * rng.standard_normal(int(rate * rng.uniform(0.08, 0.2))))
            total += pieces[-1].size
            continue
        n = int(rate * rng.uniform(0.14, 0.28))
        t = np.arange(n) / rate
        pitch = rng.uniform(95, 160) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t))
        source = np.diff(np.floor(np.cumsum(pitch) / rate), prepend=0.0) + 0.02 * rng.standard_normal(n)
        a, b = vowels[rng.integers(len(vowels))], vowels[rng.integers(len(vowels))]
        glide = t[:, None] / t[-1]
        formants = a + (b - a) * glide  # [n, 3]
        voiced = sum(_resonator(source, formants[:, k], rate) / (k + 1) for k in range(3)) * np.hanning(n) ** 0.5
        voiced = voiced / max(np.abs(voiced).max(), 1e-9) * rng.uniform(0.2, 0.45)
        if rng.random() < 0.4:  # a fricative before the vowel
            m = int(rate * rng.uniform(0.04, 0.1))
            hiss = np.diff(rng.standard_normal(m + 1)) * np.hanning(m) * 0.04
            voiced = np.concatenate([hiss, voiced])
        pieces.append(voiced)
        total += voiced.size
    wave = np.concatenate(pieces)[: int(seconds * rate)]
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave.astype(np.float32), rate)
    return path


def build(work: Path, checkpoint: Path | None = None, audio_seconds: float = 30.0,
          kinds: tuple[str, ...] = ("vision", "audio")) -> tuple[Path, Path, Path]:
    """(checkpoint, fp32 encoder folder, qnn-htp encoder folder with float/), built when missing:
    the encoder graphs `kinds` of `checkpoint` (default: the tiny multimodal checkpoint, written into
    `work`), the QDQ audio graph `audio_seconds` long (npu/ at 30 s, else npu-{seconds}s/)."""
    from gemma_export.checkpoint import open_checkpoint
    from gemma_export.encoders import write_encoders
    from gemma_export.npu_encoders import write_npu_encoders
    from gemma_export.progress import Progress

    given = checkpoint is not None
    checkpoint = checkpoint if given else work / "checkpoint"
    fp32 = work / "fp32"
    npu = work / ("npu" if audio_seconds == 30.0 else f"npu-{audio_seconds:g}s")
    if not given and not (checkpoint / "config.json").is_file():
        import multimodal_checkpoint as mc

        mc.build_model().save_pretrained(checkpoint)
        (checkpoint / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "SiglipImageProcessorFast", "do_convert_rgb": None, "do_normalize": False,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2,
            "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}))
    ckpt = open_checkpoint(str(checkpoint))
    progress = Progress(enabled=True)
    missing = tuple(k for k in kinds if not (fp32 / f"{k}.onnx").is_file())
    if missing:
        fp32.mkdir(parents=True, exist_ok=True)
        write_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), fp32, progress, kinds=missing)
    missing = tuple(k for k in kinds if not (npu / f"{k}.onnx").is_file())
    if missing:
        npu.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        _, _, record = write_npu_encoders(ckpt.config, ckpt.tensors, dict(ckpt.aux_files), npu, progress,
                                          audio_seconds=audio_seconds, keep_float=npu / "float", kinds=missing)
        old = json.loads((npu / "record.json").read_text()) if (npu / "record.json").is_file() else {}
        built = {k: round(time.perf_counter() - t, 1) for k in missing}
        record = {**old, **record, "build_s": {**_dict(old.get("build_s")), **built}}
        (npu / "record.json").write_text(json.dumps(record, indent=1))
    return checkpoint, fp32, npu


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _dequantized(qdq, name: str) -> str:
    """The QDQ graph's DequantizeLinear output of float tensor `name` (its QuantizeLinear, then
    DequantizeLinear), else `name`: a segment that ends in the float output of a node unit leaves
    that unit without its output quantization, which the HTP fails to finalize."""
    q = [n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name]
    dq = [n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and q and n.input[0] == q[0]]
    return dq[0] if dq else name


def run_segments(path: Path, segments: list[dict], graph_feeds: dict[str, np.ndarray]) -> list[dict]:
    """HTP vs CPU provider per segment of the QDQ graph `path`, each fed the tensors of the CPU
    provider's run of the whole graph (so that segments do not carry each other's error)."""
    import onnx

    qdq = onnx.load(str(path), load_external_data=False)
    segments = [{**seg, "output": _dequantized(qdq, seg["output"])} for seg in segments]
    boundary = sorted({t for s in segments for t in [*s["inputs"], s["output"]]} - set(graph_feeds))
    have = {o.name for o in qdq.graph.output}
    for name in boundary:
        if name not in have:
            qdq.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = path.parent / ".probe.onnx"
    onnx.save_model(qdq, str(probe))  # its weights: the graph's .data beside it, by reference
    del qdq
    try:
        s = _session(probe, CPU)
        names = [o.name for o in s.get_outputs()]
        values = dict(zip(names, s.run(names, graph_feeds)))
        del s
    finally:
        probe.unlink()
    values.update(graph_feeds)
    rows = []
    for seg in segments:
        segment = path.parent / f".segment-{seg['name']}.onnx"
        onnx.utils.extract_model(str(path), str(segment), seg["inputs"], [seg["output"]], check_model=False)
        row = {"name": seg["name"], "blocks": len(seg["blocks"]), "gmac": round(seg["gmac"], 2),
               "io_mib": round(sum(values[n].nbytes for n in [*seg["inputs"], seg["output"]]) / 2**20, 1)}
        try:
            feeds = {n: values[n] for n in seg["inputs"]}
            cpu = _session(segment, CPU).run(None, feeds)[0]
            t = time.perf_counter()
            htp_session = _session(segment, QNN)
            row["htp_prepare_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            htp = htp_session.run(None, feeds)[0]
            run = time.perf_counter() - t
            row.update(htp_run_s=round(run, 1), gmac_per_s=round(seg["gmac"] / run, 3), htp_vs_cpu=compare(cpu, htp))
        except Exception as err:  # onnxruntime's own error types: recorded, the next segment runs
            row["error"] = str(err).splitlines()[0][:300]
        finally:
            for f in path.parent.glob(f".segment-{seg['name']}.onnx*"):
                f.unlink()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/npu-encoders-bench"))
    p.add_argument("--image", type=Path, default=MEDIA / "photo.jpg")
    p.add_argument("--audio", type=Path, default=MEDIA / "speech.wav")
    p.add_argument("--parts", default="audio,vision,segments",
                   help="what to measure, of audio, audio-layers (HTP vs CPU per conformer layer, given the "
                        "same inputs), vision (check, QDQ vs fp32), segments, full (the whole vision graph on "
                        "the HTP: ~0.2 GMAC/s emulated, over half an hour)")
    p.add_argument("--segments", default="default", help="default | all | comma-separated block scopes")
    p.add_argument("--checkpoint", type=Path,
                   help="a Gemma 3n checkpoint whose encoders are measured (bench/full_encoders_checkpoint.py's "
                        "full-size ones, with --parts audio), instead of the tiny one built into --work")
    p.add_argument("--audio-seconds", type=float, default=30.0,
                   help="the QDQ audio graph's clip length (npu_encoders.audio_frames; the emulator's seconds "
                        "scale with it); the fp32 graph stays 30 s")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    import onnx

    from gemma_export.check import check_graph
    from gemma_export.targets import load_target
    from gemma_runtime.audio_features import audio_features
    from gemma_runtime.image_processing import ImageProcessor

    parts = set(args.parts.split(","))
    kinds = tuple(k for k, wants in (("vision", {"vision", "segments", "full"}), ("audio", {"audio", "audio-layers"}))
                  if parts & wants)
    checkpoint, fp32, npu = build(args.work, args.checkpoint, args.audio_seconds, kinds)
    report: dict = {"build": json.loads((npu / "record.json").read_text())}
    target = load_target("qnn-htp")
    audio = ref_audio = pixels = None
    if "audio" in kinds:
        if not args.audio.is_file():
            print(f"no {args.audio}: synthetic speech-like audio (speech_like) in its place", flush=True)
            args.audio = speech_like(args.work / "speech-like.wav")
        features, mask = audio_features(str(args.audio), padding="max_length")
        graph_input = onnx.load(str(npu / "audio.onnx"), load_external_data=False).graph.input[0]
        frames = graph_input.type.tensor_type.shape.dim[1].dim_value
        if mask[:, frames:].any():
            raise SystemExit(f"{args.audio} is longer than the {args.audio_seconds:g} s audio graph: "
                             "cut it or raise --audio-seconds")
        audio = {"input_features": features[:, :frames], "input_features_mask": mask[:, :frames].astype(np.float32)}
        ref_audio = {"input_features": features, "input_features_mask": mask}
        report["audio_clip"] = {"file": str(args.audio), "seconds": round(float(mask.sum()) * 160 / 16_000, 2),
                                "graph_frames": frames}
    if "vision" in kinds:
        pixels = {"pixel_values": ImageProcessor.from_folder(checkpoint)(args.image).astype(np.float32)}

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
        del cpu_session
        row["qdq_vs_fp32"] = compare(want, cpu)
        if kind == "audio":
            # the rows of the clip: the others are the padding embedding in every graph
            clip = np.any(want[0] != want[0, -1], axis=-1)
            row["clip_rows"] = int(clip.sum())
            row["qdq_vs_fp32_clip_rows"] = compare(want[:, clip], cpu[:, clip])
            gmac = sum(_macs(onnx.load(str(npu / "float" / file), load_external_data=False)).values()) / 1e9
            t = time.perf_counter()
            htp_session = _session(npu / file, QNN)
            row["htp_prepare_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            htp = htp_session.run(None, feeds)[0]
            run = time.perf_counter() - t
            row.update(gmac=round(gmac, 2), htp_run_s=round(run, 1), gmac_per_s=round(gmac / run, 3))
            row["htp_vs_cpu"] = compare(cpu, htp)
            row["htp_vs_cpu_clip_rows"] = compare(cpu[:, clip], htp[:, clip])
            row["htp_vs_fp32_clip_rows"] = compare(want[:, clip], htp[:, clip])
        report[kind] = row
        print(json.dumps({kind: row}), flush=True)

    if "audio-layers" in parts:  # HTP vs CPU per segment of the audio graph, given the same inputs
        report["audio_segments"] = run_segments(npu / "audio.onnx", audio_segments(npu / "float" / "audio.onnx"), audio)

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
    report["vision_segments"] = run_segments(npu / "vision.onnx", segments, pixels)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
