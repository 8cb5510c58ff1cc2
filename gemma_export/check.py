"""gemma-export check OUT [--target NAME]: does each graph of an export fit a target?

Per graph of the manifest: whether every input and output shape is static, the ops outside the
target's supported set (targets/*.toml [ops]), where onnxruntime places the nodes for each of the
target's providers that is installed here, and the size on disk.

Placement comes from onnxruntime itself: a session made with the config entry
"session.record_ep_graph_assignment_info" = "1" reports, per execution provider, the nodes it took
(InferenceSession.get_provider_graph_assignment_info, onnxruntime >= 1.23). For plugin EPs the CPU
fallback stays enabled here, so the report can show which nodes the accelerator left to the CPU;
the runtime itself runs them with the fallback disabled.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ExportError
from .targets import Target, load_target

ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


@dataclass(frozen=True)
class Placement:
    provider: str  # --provider name
    nodes: dict[str, int]  # onnxruntime provider name -> nodes it took
    off_provider: dict[str, int] = field(default_factory=dict)  # op type -> nodes not on `provider`
    error: str | None = None  # the session could not be made

    @property
    def complete(self) -> bool:
        return self.error is None and not self.off_provider


@dataclass(frozen=True)
class GraphReport:
    name: str
    file: str
    static: bool
    dynamic_dims: tuple[str, ...]  # "input_name[axis]=symbol" of every symbolic dimension
    nodes: int
    ops: dict[str, int]  # "domain:op" (or "op") -> count
    unsupported: dict[str, int]  # ops outside the target's set -> count
    placements: tuple[Placement, ...]
    not_installed: tuple[str, ...]  # target providers this onnxruntime lacks: no placement
    bytes: int

    def problems(self, target: Target) -> list[str]:
        out = []
        if target.static_shapes and not self.static:
            out.append(f"{_dims_summary(self.dynamic_dims)}: target {target.name} needs static shapes")
        if self.unsupported:
            out.append(f"ops outside target {target.name}: {_counts(self.unsupported)}")
        for p in self.placements:
            if p.error:
                out.append(f"{p.provider}: session failed: {p.error}")
            elif p.off_provider:
                out.append(f"{p.provider}: nodes left to other providers: {_counts(p.off_provider)}")
        return out


@dataclass(frozen=True)
class CheckReport:
    folder: str
    target: str
    graphs: tuple[GraphReport, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counter.items()))


def _op_name(domain: str, op: str) -> str:
    return op if domain in ("", "ai.onnx") else f"{domain}:{op}"


def _dynamic_dims(model) -> list[str]:
    dims = []
    for value in [*model.graph.input, *model.graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dims.append(f"{value.name}[{axis}]={dim.dim_param or '?'}")
    return dims


def _all_nodes(model):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def placement(path: Path, provider: str) -> Placement:
    """Where onnxruntime puts the nodes of `path` when `provider` (a --provider name) leads."""
    import onnxruntime as ort
    from gemma_runtime.providers import PROVIDERS, configure_session

    ort_name = PROVIDERS[provider].ort_name
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(ASSIGNMENT_KEY, "1")
    try:
        providers = configure_session(options, ort_name, cpu_fallback=True)
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime's own error types
        return Placement(provider, {}, error=str(err).splitlines()[0][:500])
    nodes: Counter = Counter()
    off: Counter = Counter()
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            nodes[subgraph.ep_name] += 1
            if subgraph.ep_name != ort_name:
                off[_op_name(node.domain, node.op_type)] += 1
    return Placement(provider, dict(nodes), dict(off))


def ops_outside(model, target: Target) -> dict[str, int]:
    """Op name -> count of the nodes of `model` (functions included) that `target`'s provider
    does not take, sorted by name."""
    counts = Counter(_op_name(n.domain, n.op_type) for n in _all_nodes(model) if not target.ops.allows(n.domain, n.op_type))
    return dict(sorted(counts.items()))


def check_graph(folder: Path, name: str, file: str, data_file: str | None, target: Target,
                providers: tuple[str, ...]) -> GraphReport:
    import onnx

    path = folder / file
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(_op_name(n.domain, n.op_type) for n in _all_nodes(model))
    unsupported = ops_outside(model, target)
    dynamic = _dynamic_dims(model)
    del model
    from gemma_runtime.providers import PROVIDERS, is_available

    installed = tuple(p for p in providers if is_available(PROVIDERS[p]))
    size = path.stat().st_size + ((folder / data_file).stat().st_size if data_file else 0)
    return GraphReport(
        name=name, file=file, static=not dynamic, dynamic_dims=tuple(dynamic), nodes=sum(ops.values()),
        ops=dict(sorted(ops.items())), unsupported=unsupported,
        placements=tuple(placement(path, p) for p in installed),
        not_installed=tuple(p for p in providers if p not in installed), bytes=size,
    )


def check_export(folder: Path, target: str | None = None, providers: tuple[str, ...] | None = None) -> CheckReport:
    """The report for every graph of the export `folder` against `target` (default: the one the
    manifest records). Placement is measured for `providers` (default: the target's providers)."""
    from gemma_runtime.manifest import ManifestError, read_manifest

    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ManifestError as err:
        raise ExportError(str(err)) from err
    spec = load_target(target or manifest.target)
    providers = tuple(providers) if providers is not None else spec.providers
    from gemma_runtime.providers import PROVIDERS

    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ExportError(f"unknown provider(s) {', '.join(unknown)} (known: {', '.join(PROVIDERS)})")
    reports, problems = [], []
    for name, graph in manifest.graphs.items():
        report = check_graph(folder, name, graph.file, graph.data_file, spec, providers)
        reports.append(report)
        problems += [f"{name}: {p}" for p in report.problems(spec)]
    return CheckReport(str(folder), spec.name, tuple(reports), tuple(problems))


def _dims_summary(dims: tuple[str, ...]) -> str:
    """"T in 37 input/output dims (inputs_embeds[1], new_key.0[2], ...)"."""
    symbols = Counter(d.split("=", 1)[1] for d in dims)
    shown = ", ".join(d.split("=", 1)[0] for d in dims[:2]) + (", ..." if len(dims) > 2 else "")
    return f"symbolic {', '.join(f'{s} in {n} input/output dims' for s, n in symbols.items())} ({shown})"


def format_report(report: CheckReport) -> str:
    from gemma_runtime.providers import PROVIDERS, unavailable_reason

    lines = [f"{report.folder} against target {report.target}:"]
    for g in report.graphs:
        lines.append(f"  {g.name} ({g.file}, {g.bytes / 2**20:.1f} MiB): {g.nodes} nodes, "
                     f"{'static' if g.static else _dims_summary(g.dynamic_dims)}")
        lines.append(f"    ops outside the target: {_counts(g.unsupported) or 'none'}")
        for p in g.placements:
            if p.error:
                lines.append(f"    {p.provider}: session failed: {p.error}")
            else:
                lines.append(f"    {p.provider}: placement {_counts(p.nodes)}"
                             + (f"; not on it: {_counts(p.off_provider)}" if p.off_provider else ""))
        for p in g.not_installed:
            lines.append(f"    {p}: {unavailable_reason(PROVIDERS[p])} (no placement)")
    lines.append("ok" if report.ok else f"{len(report.problems)} problem(s):\n  " + "\n  ".join(report.problems))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gemma-export check", description=__doc__.splitlines()[0])
    p.add_argument("out", metavar="OUT", type=Path, help="an export folder")
    p.add_argument("--target", help="target to check against (default: the manifest's)")
    p.add_argument("--provider", action="append", dest="providers",
                   help="measure placement for this provider (repeatable; default: the target's providers)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    args = p.parse_args(argv)
    report = check_export(args.out, args.target, tuple(args.providers) if args.providers else None)
    print(report.to_json() if args.json else format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
