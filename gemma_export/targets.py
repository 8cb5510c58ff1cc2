"""Build targets: per-device recipes read from targets/*.toml into frozen dataclasses.

A target names a build (which graphs, weight format, activation dtype, static sizes, graph passes,
the ops its provider takes); the runtime's --provider names an execution provider. The files live
in the repository's top-level targets/ folder, installed as the package `gemma_export.target_files`
(setup.py), so they are read the same way from a checkout and from a wheel.

Every field is checked when a file loads: an unknown key, provider, graph, pass, recipe or dtype
is an error that names the file and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources

from .errors import ExportError

WEIGHT_FORMATS = ("float", "matmulnbits", "qdq")
ACTIVATION_DTYPES = ("none", "uint8", "uint16")
GRAPHS = ("decoder", "prefill", "decode", "vision", "audio")
OVERRIDABLE = ("quant", "max_context", "prefill_chunk")
OP_DOMAINS = ("", "com.microsoft")
ATTENTIONS = ("two-block", "group-query")  # model/text.py's; spelled here so targets load without torch
# bits a weight format can store: float16/32 storage, MatMulNBits 4/8, QDQ int4/int8
FORMAT_BITS = {"float": (16, 32), "matmulnbits": (4, 8), "qdq": (4, 8)}


@dataclass(frozen=True)
class WeightSpec:
    format: str  # "float" | "matmulnbits" | "qdq"
    bits: tuple[int, ...]
    quant: str  # default recipe (recipes.py)
    quants: tuple[str, ...]  # recipes this target accepts


@dataclass(frozen=True)
class OpSet:
    """The ops the target's provider takes: every standard op unless `standard` lists them, and of
    onnxruntime's contrib domain only when "com.microsoft" is in `domains` (all of them unless
    `contrib` lists them)."""

    domains: tuple[str, ...]
    standard: tuple[str, ...] | None = None
    contrib: tuple[str, ...] | None = None

    def allows(self, domain: str, op_type: str) -> bool:
        domain = "" if domain == "ai.onnx" else domain
        if domain not in self.domains:
            return False
        listed = self.standard if domain == "" else self.contrib
        return listed is None or op_type in listed


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    providers: tuple[str, ...]  # gemma-run --provider names, most preferred first
    graphs: tuple[str, ...]
    static_shapes: bool
    passes: tuple[str, ...]  # graph passes by name (passes/graph_passes.py's GRAPH_PASSES)
    weights: WeightSpec
    activations: str  # "none" | "uint8" | "uint16"
    prefill_chunk: int
    max_context: int
    overridable: tuple[str, ...]
    ops: OpSet
    # the decoder's attention (model/text.py ATTENTIONS): "two-block" (standard ops, runtime-written
    # cache rows) or "group-query" (onnxruntime's GroupQueryAttention, cache updated in place)
    attention: str = "two-block"

    @property
    def decoder_graphs(self) -> tuple[str, ...]:
        return tuple(g for g in self.graphs if g in ("decoder", "prefill", "decode"))

    def with_overrides(self, quant: str | None = None, max_context: int | None = None,
                       prefill_chunk: int | None = None) -> tuple[str, int, int]:
        """(quant, max_context, prefill_chunk): the target's, with the command line's where the
        target allows it; a value the target does not allow is an error."""
        asked = {"quant": quant, "max_context": max_context, "prefill_chunk": prefill_chunk}
        for key, value in asked.items():
            if value is not None and key not in self.overridable and value != self._default(key):
                flag = "--" + key.replace("_", "-")
                raise ExportError(f"target {self.name} fixes {key} = {self._default(key)}: {flag} {value} is not allowed")
        if quant is not None and quant not in self.weights.quants:
            raise ExportError(f"target {self.name} builds {', '.join(self.weights.quants)}; --quant {quant} is not one of them")
        return (self.weights.quant if quant is None else quant, self.max_context if max_context is None else max_context,
                self.prefill_chunk if prefill_chunk is None else prefill_chunk)

    def stores(self, recipe):
        """recipes.Recipe `recipe` as this target stores weights: a QDQ target with one decoder
        graph (openvino) gets its integer weights as DequantizeLinear + MatMul (standard ops:
        recipes.WEIGHT_STORAGES); other targets take it unchanged (static NPU graphs are
        QDQ-quantized whole by npu_export.py)."""
        if self.weights.format == "qdq" and not self.static_shapes:
            return recipe.with_storage("qdq")
        return recipe

    def _default(self, key: str):
        return self.weights.quant if key == "quant" else getattr(self, key)


def target_names() -> tuple[str, ...]:
    return tuple(sorted(f.name[: -len(".toml")] for f in _folder().iterdir() if f.name.endswith(".toml")))


def load_target(name: str) -> Target:
    names = target_names()
    if name not in names:
        raise ExportError(f"--target {name} is not a target (targets: {', '.join(names)})")
    text = (_folder() / f"{name}.toml").read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ExportError(f"targets/{name}.toml is not valid TOML: {err}") from err
    return parse_target(name, raw)


def _folder():
    return resources.files("gemma_export.target_files")


# ---- parsing and checks -----------------------------------------------------------------------

_TOP = {"description": str, "providers": list, "graphs": list, "static_shapes": bool, "passes": list,
        "attention": str, "weights": dict, "activations": dict, "shapes": dict, "ops": dict}
_SECTIONS = {
    "weights": {"format": str, "bits": list, "quant": str, "quants": list},
    "activations": {"dtype": str},
    "shapes": {"prefill_chunk": int, "max_context": int, "overridable": list},
    "ops": {"domains": list, "standard": list, "contrib": list},
}
_OPTIONAL = {("ops", "standard"), ("ops", "contrib"), (None, "attention")}


def _fields(where: str, raw: dict, spec: dict, section: str | None = None) -> None:
    unknown = sorted(set(raw) - set(spec))
    if unknown:
        raise ExportError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(spec)})")
    for key, kind in spec.items():
        if key not in raw:
            if (section, key) in _OPTIONAL:
                continue
            raise ExportError(f"{where}: missing field {key!r}")
        value = raw[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ExportError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")


def _choices(where: str, field: str, values, allowed) -> tuple:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ExportError(f"{where}: {field} {bad} not among {list(allowed)}")
    if len(set(values)) != len(values):
        raise ExportError(f"{where}: {field} lists a value twice: {list(values)}")
    return tuple(values)


def parse_target(name: str, raw: dict) -> Target:
    """A checked Target from the parsed TOML of targets/<name>.toml."""
    from gemma_runtime.providers import PROVIDERS

    from .recipes import RECIPES

    where = f"targets/{name}.toml"
    _fields(where, raw, _TOP)
    for section, spec in _SECTIONS.items():
        _fields(f"{where} [{section}]", raw[section], spec, section)
    w, s, o = raw["weights"], raw["shapes"], raw["ops"]
    providers = _choices(where, "providers", raw["providers"], PROVIDERS)
    if not providers:
        raise ExportError(f"{where}: providers is empty")
    graphs = _choices(where, "graphs", raw["graphs"], GRAPHS)
    static = raw["static_shapes"]
    if ("decoder" in graphs) == ({"prefill", "decode"} <= set(graphs)) or ("prefill" in graphs) != ("decode" in graphs):
        raise ExportError(f"{where}: graphs must hold either 'decoder' (one graph, symbolic chunk) or both 'prefill' "
                          f"and 'decode' (static), got {list(graphs)}")
    if static != ("decoder" not in graphs):
        raise ExportError(f"{where}: static_shapes = {str(static).lower()} contradicts graphs {list(graphs)} "
                          "(static targets build 'prefill' + 'decode', others one 'decoder')")
    fmt = w["format"]
    _choices(where, "weights.format", [fmt], WEIGHT_FORMATS)
    bits = _choices(where, "weights.bits", w["bits"], FORMAT_BITS[fmt])
    quants = _choices(where, "weights.quants", w["quants"], RECIPES)
    if w["quant"] not in quants:
        raise ExportError(f"{where}: weights.quant {w['quant']!r} is not in weights.quants {list(quants)}")
    activations = raw["activations"]["dtype"]
    _choices(where, "activations.dtype", [activations], ACTIVATION_DTYPES)
    if activations != "none" and fmt != "qdq":
        raise ExportError(f"{where}: quantized activations ({activations}) need QDQ weights, not {fmt}")
    for key in ("prefill_chunk", "max_context"):
        if s[key] < 1:
            raise ExportError(f"{where}: shapes.{key} must be positive, got {s[key]}")
    if s["max_context"] < s["prefill_chunk"]:
        raise ExportError(f"{where}: max_context {s['max_context']} is below prefill_chunk {s['prefill_chunk']}")
    domains = _choices(where, "ops.domains", o["domains"], OP_DOMAINS)
    if "" not in domains:
        raise ExportError(f"{where}: ops.domains must include the standard domain \"\"")
    if "contrib" in o and "com.microsoft" not in domains:
        raise ExportError(f"{where}: ops.contrib lists contrib ops but domains lacks \"com.microsoft\"")
    attention = raw.get("attention", "two-block")
    _choices(where, "attention", [attention], ATTENTIONS)
    if attention != "two-block" and (static or "com.microsoft" not in domains
                                     or ("contrib" in o and "GroupQueryAttention" not in o["contrib"])):
        raise ExportError(f"{where}: attention {attention!r} is onnxruntime's GroupQueryAttention: it needs a "
                          "symbolic-chunk graph and a provider that takes that contrib op")
    passes = _check_passes(where, raw["passes"])
    if passes and "com.microsoft" not in domains:
        raise ExportError(f"{where}: passes {list(passes)} write contrib ops, which this target's provider does not take")
    return Target(
        name=name, description=raw["description"], providers=providers, graphs=graphs, static_shapes=static,
        passes=passes, weights=WeightSpec(fmt, bits, w["quant"], quants), activations=activations,
        prefill_chunk=s["prefill_chunk"], max_context=s["max_context"],
        overridable=_choices(where, "shapes.overridable", s["overridable"], OVERRIDABLE),
        ops=OpSet(domains, tuple(o["standard"]) if "standard" in o else None,
                  tuple(o["contrib"]) if "contrib" in o else None),
        attention=attention,
    )


def _check_passes(where: str, names: list) -> tuple[str, ...]:
    known = graph_pass_names()
    return _choices(where, "passes", names, known)


# The passes named before passes/graph_passes.py (another change) lands: validation uses its
# registry GRAPH_PASSES as soon as that module exists, and this list only until then.
PLANNED_GRAPH_PASSES = ("ort-fusions",)


def graph_pass_names() -> tuple[str, ...]:
    """The graph passes a target may name: the keys of passes/graph_passes.py's registry."""
    try:
        from .passes.graph_passes import GRAPH_PASSES
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.passes.graph_passes":
            raise
        return PLANNED_GRAPH_PASSES
    return tuple(GRAPH_PASSES)
