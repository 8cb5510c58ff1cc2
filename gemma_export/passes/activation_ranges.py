"""Min/max of every tensor of a float ONNX graph over calibration feeds, in bounded memory.

onnxruntime's calibrator adds every intermediate tensor as a graph output and keeps them all:
the full-size vision tower (MobileNetV5 at 768x768) holds 13 GiB of intermediates per image. Here
the graph is cut, in its node order, into segments whose tensors fit a byte budget; each segment
runs as its own onnxruntime CPU session on the tensors it needs from the graph inputs and earlier
segments, and only the tensors later segments still read are kept between them:

    nodes [0, a) -> segment 0: inputs = graph inputs it reads; outputs = every tensor it makes
    nodes [a, b) -> segment 1: inputs = tensors of segment 0 / graph inputs it reads ...
    min/max of each output (and of each graph input) accumulated over the feeds

    tensor_ranges(path, feeds)    -> {name: (min, max)} float32   (the model file is not changed)

The ranges are what onnxruntime's MinMax calibrator computes (plain min and max over all feeds);
passes over QDQ models read them through its calibration cache (write_calibration_cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference

SEGMENT_BYTES = 1 << 30  # tensors made by one segment for one feed (float32, from shape inference)


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    return {v.name: v for v in [*g.value_info, *g.input, *g.output]}


def _bytes(info: onnx.ValueInfoProto | None) -> int:
    if info is None or not info.type.tensor_type.shape.dim:
        return 4
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim]
    return 4 * int(np.prod(dims))


def segments(model: onnx.ModelProto, infos: dict[str, onnx.ValueInfoProto], budget: int = SEGMENT_BYTES) -> list[range]:
    """Node index ranges, in graph order, each making at most `budget` bytes of tensors (a single
    node that makes more is a segment of its own); `infos`: the shapes from shape inference."""
    out, start, used = [], 0, 0
    for i, node in enumerate(model.graph.node):
        size = sum(_bytes(infos.get(o)) for o in node.output if o)
        if used and used + size > budget:
            out.append(range(start, i))
            start, used = i, 0
        used += size
    if start < len(model.graph.node):
        out.append(range(start, len(model.graph.node)))
    return out


def _segment_model(model: onnx.ModelProto, nodes: range, infos: dict, inits: dict) -> onnx.ModelProto:
    g = model.graph
    made: set[str] = set()
    inputs: list[str] = []
    used_inits: list[str] = []
    for i in nodes:
        node = g.node[i]
        for name in node.input:
            if not name or name in made or name in inputs or name in used_inits:
                continue
            (used_inits if name in inits else inputs).append(name)
        made.update(o for o in node.output if o)
    produced = [o for i in nodes for o in g.node[i].output if o]
    graph = helper.make_graph(
        [g.node[i] for i in nodes], "segment",
        [infos[n] for n in inputs],
        [infos.get(n) or helper.make_empty_tensor_value_info(n) for n in produced],
        [inits[n] for n in used_inits],
    )
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def tensor_ranges(path: Path, feeds: list[dict[str, np.ndarray]], budget: int = SEGMENT_BYTES,
                  threads: int | None = None, progress=None) -> dict[str, tuple[np.float32, np.float32]]:
    """{tensor: (min, max)} of every float tensor of the model at `path` over `feeds`: graph inputs
    and every node output, initializers excluded. Each segment is written beside `path` (its
    weights stay in the model's external data file, read by reference) and removed after its run."""
    import onnxruntime as ort

    if not feeds:
        raise ValueError("no calibration feeds")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    infos = _value_infos(model)
    inits = {t.name: t for t in g.initializer}
    parts = segments(model, infos, budget)
    # the last segment that reads each tensor: tensors are dropped after it
    last_use: dict[str, int] = {}
    for s, nodes in enumerate(parts):
        for i in nodes:
            for name in g.node[i].input:
                last_use[name] = s
    outputs = {o.name for o in g.output}
    live = [dict(f) for f in feeds]
    ranges: dict[str, list[float]] = {}

    def record(name: str, value: np.ndarray) -> None:
        if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
            return
        lo, hi = float(np.min(value)), float(np.max(value))
        r = ranges.get(name)
        ranges[name] = [lo, hi] if r is None else [min(r[0], lo), max(r[1], hi)]

    for feed in live:
        for name, value in feed.items():
            record(name, value)
    for s, nodes in enumerate(parts):
        file = path.with_name(f".{path.stem}.segment-{s}.onnx")
        onnx.save_model(_segment_model(model, nodes, infos, inits), str(file))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as in the graph
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        finally:
            file.unlink()
        names = [o.name for o in session.get_outputs()]
        wanted = [i.name for i in session.get_inputs()]
        for feed in live:
            values = session.run(names, {n: feed[n] for n in wanted})
            for name, value in zip(names, values):
                record(name, value)
                if last_use.get(name, -1) > s or name in outputs:
                    feed[name] = value
            for name in list(feed):
                if last_use.get(name, -1) <= s and name not in outputs:
                    del feed[name]
        del session
        if progress is not None:
            progress(f"segment {s + 1}/{len(parts)}")
    return {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()}


def write_calibration_cache(ranges: dict[str, tuple[np.float32, np.float32]], path: Path) -> Path:
    """onnxruntime's calibration cache (quantize_static's calibration_cache_path) of MinMax ranges."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {k: (np.array(lo, np.float32), np.array(hi, np.float32))
                                                  for k, (lo, hi) in ranges.items()})
    save_tensors_data(data, path)
    return Path(path)
