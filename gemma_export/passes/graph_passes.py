"""Graph passes by name: the registry that targets (targets/*.toml `passes`) and
`gemma-export --graph-passes` refer to, and their application to a written decoder graph.

A pass is a pure function ModelProto -> ModelProto; big initializers may stay external
references (onnx.load(..., load_external_data=False)) resolved against `base_dir`. Passes run
after quantization: they leave MatMul/MatMulNBits nodes and their weights as they are.

- "ort-fusions": onnxruntime contrib-op fusions (SimplifiedLayerNormalization,
  SkipSimplifiedLayerNormalization, FastGelu, RotaryEmbedding, scale folding): passes/fusions.py.
  For providers with onnxruntime's contrib ops (CPU, CUDA); NPU targets name no pass and keep
  the standard-ONNX graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import ExportError
from .fusions import ort_fusions

NONE = "none"  # command-line spelling of "no pass"


@dataclass(frozen=True)
class GraphPass:
    name: str
    # (model, base_dir) -> (new model, what it did: a JSON-able dict)
    run: Callable[[onnx.ModelProto, Path | None], tuple[onnx.ModelProto, dict]]
    contrib_ops: bool  # writes ops of onnxruntime's com.microsoft domain
    min_onnxruntime: str  # oldest onnxruntime whose CPU provider runs what it writes
    description: str

    def __call__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
        return self.run(model, base_dir)[0]


def _ort_fusions(model: onnx.ModelProto, base_dir: Path | None) -> tuple[onnx.ModelProto, dict]:
    fused, report = ort_fusions(model, base_dir)
    return fused, {"fusions": {k: v for k, v in report.fusions.items() if v}}


GRAPH_PASSES: dict[str, GraphPass] = {
    p.name: p
    for p in (
        GraphPass("ort-fusions", _ort_fusions, contrib_ops=True, min_onnxruntime="1.17",
                  description="RMSNorm (+ residual add), FastGelu, RotaryEmbedding, scale folding"),
    )
}


def parse_graph_passes(text: str) -> tuple[str, ...]:
    """`--graph-passes` value: "none" or comma-separated registry names, checked."""
    names = () if text.strip() == NONE else tuple(n.strip() for n in text.split(","))
    check_graph_passes(names)
    return names


def passes_for_target(text: str, target_name: str) -> tuple[str, ...]:
    """`--graph-passes` checked against the target: contrib-op passes need a provider that takes
    onnxruntime's com.microsoft ops (targets/*.toml [ops] domains)."""
    from ..targets import load_target

    names = parse_graph_passes(text)
    target = load_target(target_name)
    contrib = [n for n in names if GRAPH_PASSES[n].contrib_ops]
    if contrib and "com.microsoft" not in target.ops.domains:
        raise ExportError(f"--graph-passes {', '.join(contrib)} write onnxruntime contrib ops, which target "
                          f"{target_name}'s provider does not take")
    return names


def check_graph_passes(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in GRAPH_PASSES]
    if unknown:
        raise ExportError(f"unknown graph pass(es) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(GRAPH_PASSES)}, or {NONE!r})")
    if len(set(names)) != len(names):
        raise ExportError(f"graph passes listed twice: {', '.join(names)}")


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def apply_graph_passes(folder: Path, graph_file: str, names: Sequence[str]) -> dict:
    """Runs the named passes over `folder/graph_file` in place (its external data, in `folder`,
    is read only where a pass folds a factor into a small weight, never rewritten; new small
    tensors are stored inside the graph). Returns the provenance record: the passes, node counts
    before and after, and what each pass did."""
    check_graph_passes(names)
    path = Path(folder) / graph_file
    model = onnx.load(str(path), load_external_data=False)
    original = {t.name: _external(t) for t in model.graph.initializer if _external(t) is not None}
    record: dict = {"passes": list(names), "nodes_before": node_count(model)}
    for name in names:
        model, details = GRAPH_PASSES[name].run(model, Path(folder))
        record[name] = details
    record["nodes_after"] = node_count(model)
    if names:
        _write_back_in_place(model, original, Path(folder))
        onnx.save_model(model, str(path))
    return record


def _external(t: onnx.TensorProto) -> dict[str, str] | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def _write_back_in_place(model: onnx.ModelProto, original: dict[str, dict[str, str]], folder: Path) -> None:
    """Weights a pass changed under their own name (a scale folded into a norm weight) come back
    inline: their new bytes go where the old ones were in the data file, and the graph refers to
    them there again. The data file keeps its layout, so fusing before or after quantization
    writes the same bytes."""
    for t in model.graph.initializer:
        where = original.get(t.name)
        if where is None or _external(t) is not None or not t.raw_data:
            continue
        if len(t.raw_data) != int(where["length"]):
            raise ValueError(f"graph pass changed the size of weight {t.name}")
        with open(folder / where["location"], "r+b") as f:
            f.seek(int(where.get("offset", 0)))
            f.write(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in where.items():
            entry = t.external_data.add()
            entry.key, entry.value = key, value


def min_onnxruntime(names: Sequence[str]) -> str | None:
    """The newest of the passes' minimum onnxruntime versions, or None without passes."""
    versions = [GRAPH_PASSES[n].min_onnxruntime for n in names]
    return max(versions, key=lambda v: tuple(int(p) for p in v.split("."))) if versions else None
