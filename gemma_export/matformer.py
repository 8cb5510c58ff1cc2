"""MatFormer slicing of Gemma 3n: a smaller model cut out of E4B, as a checkpoint transform.

Gemma 3n E4B is a Matryoshka model: sub-models live inside it. A slice keeps, for every kept
layer, the first `d_i` neurons of its FFN, and skips whole layers. Google publishes a table of
slices (`data/gemma3n-slicing.csv`, copied from `/work/shared/matformer`); `--matformer NAME` picks
one, `--ffn-dims` / `--skip-layers` describe a custom one.

The slice is applied before the variant is read: `slice_checkpoint(config, tensors, slice)`
returns a new config.json dict and a `SlicedTensors` source that renames and cuts tensors lazily,
one at a time on `get()`, so the rest of the exporter sees an ordinary, smaller checkpoint.

What a slice does to the checkpoint (L layers, P = hidden_size_per_layer_input)::

    layers.j.*                      kept j -> layers.i.* (renumbered in order); skipped j -> dropped
    layers.j.mlp.gate_proj/up_proj  [d_j, H] -> first d_i rows
    layers.j.mlp.down_proj          [H, d_j] -> first d_i columns
    embed_tokens_per_layer          [V, L*P] -> the P-wide column block of each kept layer
    per_layer_model_projection      [L*P, H] -> the P rows of each kept layer
    everything else (embeddings, final norm, AltUp projections, vision/audio towers): as is
    config: num_hidden_layers, layer_types, intermediate_size, activation_sparsity_pattern cut to
            the kept layers; num_kv_shared_layers = the kept layers that shared KV in the source

Refused (MatformerError, one line that says why): layers out of range or listed twice, a slice that
skips every layer, FFN dims that do not match the kept layers in number, exceed a layer's size or
are < 1, and a skip that would change which layer produces a shared KV cache (Gemma 3n rule,
`Variant.kv_source`: a KV-shared layer reads the last non-shared layer of its attention type).

Counting rule for the effective parameter count (`parameter_counts`), the one Google's table uses
(it reproduces E4B's 3.98B, E2B's 1.91B and every row within 1%, tests/test_matformer.py): every
tensor of the text decoder in the (sliced) checkpoint, including the k/v projections and norms that
the released checkpoints store for KV-shared layers, excluding the token embedding table
(`embed_tokens`, whose tied LM head is the same tensor), the per-layer embedding table
(`embed_tokens_per_layer`) and an untied `lm_head`; the vision and audio towers and their
embedders are not counted. The total adds the embedding tables back (what the export's text
path carries); the towers are reported apart (`non_text_params`, when the export or the sliced
folder carries them: not under --text-only).
"""

from __future__ import annotations

import copy
import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ExportError

DEFAULT_TABLE = Path(__file__).parent / "data" / "gemma3n-slicing.csv"
CUSTOM = "custom"
_COLUMNS = ("name", "# Layers", "# Effective Params (B)", "MMLU PT accuracy", "FFN Hidden Dims", "Layers Skipped")
_LAYER = re.compile(r"layers\.(\d+)\.(.*)", re.DOTALL)
_EMBEDDINGS = ("embed_tokens.weight", "embed_tokens_per_layer.weight")


class MatformerError(ExportError):
    """A slicing table that cannot be read, or a slice that does not fit the checkpoint."""


@dataclass(frozen=True)
class Slice:
    """One sub-model: FFN sizes of the kept layers (in order) and the skipped source layers."""

    name: str
    ffn_dims: tuple[int, ...] | None  # per kept layer; None = keep each layer's full FFN
    skipped_layers: tuple[int, ...] = ()
    table_layers: int | None = None  # the table's "# Layers"
    table_effective_params_b: float | None = None  # the table's "# Effective Params (B)"
    mmlu_pt: str | None = None  # the table's "MMLU PT accuracy", as written ("50.90%")


# --------------------------------------------------------------------------------------------
# the table and the command line's lists


def _int_expr(text: str, what: str) -> int:
    """An int written as in the table: `8192`, `2_048 * 4` (a product of integer literals)."""
    try:
        return math.prod(int(part.strip()) for part in text.split("*"))
    except ValueError:
        raise MatformerError(f"{what}: {text.strip()!r} is not an integer or a product of integers") from None


def parse_dims(text: str, what: str = "--ffn-dims") -> tuple[int, ...]:
    """`[2_048 * 4, 8192, ...]` or `8192,8192` -> ints."""
    body = text.strip().removeprefix("[").removesuffix("]").strip()
    if not body:
        raise MatformerError(f"{what}: empty list")
    return tuple(_int_expr(item, what) for item in body.split(","))


def parse_layers(text: str, what: str = "--skip-layers") -> tuple[int, ...]:
    """`[20, 21]`, `20,21` or `20-24` (inclusive ranges) -> ints; empty -> ()."""
    body = text.strip().removeprefix("[").removesuffix("]").strip()
    out: list[int] = []
    for item in filter(None, (i.strip() for i in body.split(","))):
        lo, dash, hi = item.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if dash and lo else [int(item)])
        except ValueError:
            raise MatformerError(f"{what}: {item!r} is not a layer index or a range like 20-24") from None
    return tuple(out)


def read_table(path: str | Path | None = None) -> dict[str, Slice]:
    """The slicing table (CSV, columns as in Google's / mistral.rs's gemma3n.csv) by slice name."""
    path = Path(path) if path is not None else DEFAULT_TABLE
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MatformerError(f"{path}: cannot read the slicing table: {err}") from None
    if not rows or any(c not in rows[0] for c in _COLUMNS):
        raise MatformerError(f"{path}: not a slicing table: it needs the columns {', '.join(_COLUMNS)}")
    table: dict[str, Slice] = {}
    for n, row in enumerate(rows, start=2):
        where = f"{path} line {n} ({row['name']!r})"
        dims = parse_dims(row["FFN Hidden Dims"] or "", f"{where}: FFN Hidden Dims")
        skipped = parse_layers(row["Layers Skipped"] or "", f"{where}: Layers Skipped")
        layers = _int_expr(row["# Layers"], f"{where}: # Layers")
        if layers != len(dims):
            raise MatformerError(f"{where}: # Layers is {layers} but FFN Hidden Dims lists {len(dims)} sizes")
        try:
            params = float(row["# Effective Params (B)"])
        except ValueError:
            raise MatformerError(f"{where}: # Effective Params (B) {row['# Effective Params (B)']!r} is not a number") from None
        if row["name"] in table:
            raise MatformerError(f"{where}: the name is listed twice")
        table[row["name"]] = Slice(row["name"], dims, skipped, layers, params, (row["MMLU PT accuracy"] or "").strip() or None)
    return table


def resolve_slice(
    name: str | None = None,
    table: str | Path | None = None,
    ffn_dims: str | Sequence[int] | None = None,
    skip_layers: str | Sequence[int] | None = None,
) -> Slice | None:
    """What the user asked for (`--matformer`, `--matformer-config`, `--ffn-dims`, `--skip-layers`)
    -> a Slice, or None when no slicing was asked for."""
    custom = ffn_dims is not None or skip_layers is not None
    if name is not None and custom:
        raise MatformerError("--matformer takes a slice from the table; --ffn-dims/--skip-layers describe a custom one: give one or the other")
    if table is not None and name is None:
        raise MatformerError("--matformer-config names a slicing table: say which slice with --matformer NAME")
    if name is not None:
        slices = read_table(table)
        if name not in slices:
            raise MatformerError(f"no slice named {name!r} in {table or DEFAULT_TABLE}; known: " + "; ".join(slices))
        return slices[name]
    if not custom:
        return None
    dims = parse_dims(ffn_dims) if isinstance(ffn_dims, str) else (None if ffn_dims is None else tuple(ffn_dims))
    skipped = parse_layers(skip_layers) if isinstance(skip_layers, str) else tuple(skip_layers or ())
    return Slice(CUSTOM, dims, skipped)


# --------------------------------------------------------------------------------------------
# the layer plan: which source layer goes where, and the new config


@dataclass(frozen=True)
class LayerPlan:
    kept: tuple[int, ...]  # source layer of each new layer
    ffn_dims: tuple[int, ...]  # per new layer
    source_layers: int
    per_layer_dim: int


def _text_dict(config: dict[str, Any]) -> dict[str, Any]:
    from .variants import ARCHITECTURES, _architecture

    key = ARCHITECTURES[_architecture(config)][1]
    return config[key] if key else config


def _source_producers(types: Sequence[str], shared: int) -> dict[int, int]:
    """KV-shared layer -> the layer whose cache it reads (transformers' / Variant.kv_source rule)."""
    n = len(types)
    first = n - shared
    out = {}
    for layer in range(first, n):
        producers = [i for i in range(first) if types[i] == types[layer]]
        out[layer] = producers[-1] if producers else -1
    return out


def plan_layers(config: dict[str, Any], s: Slice) -> tuple[LayerPlan, dict[str, Any]]:
    """Check the slice against the checkpoint's config; return the layer plan and the new config."""
    from .variants import ARCHITECTURES, _architecture, normalized_text_config

    architecture = _architecture(config)
    if ARCHITECTURES[architecture][0] != "gemma3n":
        raise MatformerError(f"MatFormer slicing applies to Gemma 3n checkpoints; this one is {architecture}")
    cfg = normalized_text_config(config)
    n = cfg.num_hidden_layers
    types = list(cfg.layer_types)
    sizes = [int(x) for x in cfg.intermediate_size]
    shared = cfg.num_kv_shared_layers
    out_of_range = sorted({i for i in s.skipped_layers if not 0 <= i < n})
    if out_of_range:
        raise MatformerError(f"slice {s.name!r}: skipped layer(s) {out_of_range} out of range: the checkpoint has layers 0-{n - 1}")
    twice = sorted({i for i in s.skipped_layers if s.skipped_layers.count(i) > 1})
    if twice:
        raise MatformerError(f"slice {s.name!r}: layer(s) {twice} listed twice in the skipped layers")
    kept = tuple(i for i in range(n) if i not in set(s.skipped_layers))
    if not kept:
        raise MatformerError(f"slice {s.name!r} skips all {n} layers")
    dims = s.ffn_dims if s.ffn_dims is not None else tuple(sizes[i] for i in kept)
    if len(dims) == 1 and len(kept) > 1 and s.name == CUSTOM:
        dims = dims * len(kept)  # --ffn-dims 8192: every kept layer
    if len(dims) != len(kept):
        raise MatformerError(
            f"slice {s.name!r} gives {len(dims)} FFN sizes for {len(kept)} kept layers "
            f"({n} layers, {len(s.skipped_layers)} skipped): one size per kept layer")
    for new, (old, d) in enumerate(zip(kept, dims)):
        if not 1 <= d <= sizes[old]:
            raise MatformerError(
                f"slice {s.name!r}: layer {old} (layer {new} of the slice) would keep {d} FFN neurons, "
                f"but it has {sizes[old]}: a slice keeps 1..{sizes[old]}")
    # KV sharing: every kept shared layer must read the same producer as in the source
    before = _source_producers(types, shared)
    new_index = {old: new for new, old in enumerate(kept)}
    new_types = [types[i] for i in kept]
    new_shared = sum(1 for i in kept if i >= n - shared)
    after = _source_producers(new_types, new_shared)
    for old in kept:
        if old not in before:
            continue
        producer = before[old]
        now = after[new_index[old]]
        if producer not in new_index:
            raise MatformerError(
                f"slice {s.name!r} skips layer {producer}, which produces the {types[old]} KV cache that "
                f"KV-shared layer {old} reads; keep layer {producer} or skip every layer that reads it")
        if now != new_index[producer]:
            got = kept[now] if now >= 0 else None
            raise MatformerError(
                f"slice {s.name!r} would make KV-shared layer {old} read layer {got}'s cache instead of "
                f"layer {producer}'s")
    new_config = copy.deepcopy(config)
    text = _text_dict(new_config)
    text["num_hidden_layers"] = len(kept)
    text["layer_types"] = new_types
    text["intermediate_size"] = list(dims)
    text["activation_sparsity_pattern"] = [float(cfg.activation_sparsity_pattern[i]) for i in kept]
    text["num_kv_shared_layers"] = new_shared
    return LayerPlan(kept, tuple(dims), n, cfg.hidden_size_per_layer_input), new_config


# --------------------------------------------------------------------------------------------
# tensors, sliced lazily


@dataclass(frozen=True)
class _Op:
    """new tensor = source tensor, cut. kind: copy | rows | cols | row_blocks | col_blocks."""

    source: str
    kind: str = "copy"
    keep: int | tuple[int, ...] = 0  # rows/cols: how many first; *_blocks: which P-wide blocks
    block: int = 0

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "rows":
            return (self.keep, *shape[1:])
        if self.kind == "cols":
            return (shape[0], self.keep, *shape[2:])
        if self.kind == "row_blocks":
            return (len(self.keep) * self.block, *shape[1:])
        if self.kind == "col_blocks":
            return (shape[0], len(self.keep) * self.block)
        return shape

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "rows":
            return t[: self.keep].contiguous()
        if self.kind == "cols":
            return t[:, : self.keep].contiguous()
        if self.kind in ("row_blocks", "col_blocks"):
            index = torch.cat([torch.arange(b * self.block, (b + 1) * self.block) for b in self.keep])
            return t.index_select(0 if self.kind == "row_blocks" else 1, index).contiguous()
        return t


class SlicedTensors:
    """A TensorSource over another one: the slice's names and shapes, tensors cut on `get()`."""

    def __init__(self, inner, ops: dict[str, _Op]):
        self.inner = inner
        self._ops = ops

    def names(self) -> list[str]:
        return list(self._ops)

    def source_name(self, name: str) -> str:
        return self._op(name).source

    def shape(self, name: str) -> tuple[int, ...]:
        op = self._op(name)
        return op.shape(tuple(self.inner.shape(op.source)))

    def get(self, name: str) -> torch.Tensor:
        """As float32 (the TensorSource contract); a cut tensor is cut in its stored dtype first,
        so the float32 copy is only ever made of what is kept (the per-layer table: GBs)."""
        op = self._op(name)
        if op.kind == "copy" or not hasattr(self.inner, "get_stored"):
            return op.apply(self.inner.get(op.source))
        t = op.apply(self.inner.get_stored(op.source))
        if not t.is_floating_point():
            raise MatformerError(f"{op.source}: dtype {t.dtype} is not a float dtype; quantized checkpoints are not sliced")
        return t.to(torch.float32).contiguous()

    def get_stored(self, name: str) -> torch.Tensor:
        """The cut tensor in the source's stored dtype (bf16 stays bf16), for writing a checkpoint."""
        op = self._op(name)
        getter = getattr(self.inner, "get_stored", self.inner.get)
        return op.apply(getter(op.source))

    def dtype(self, name: str) -> str | None:
        """The source's stored safetensors dtype, when it says (SafetensorsSource)."""
        dtype = getattr(self.inner, "dtype", None)
        return dtype(self._op(name).source) if callable(dtype) else None

    def _op(self, name: str) -> _Op:
        try:
            return self._ops[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in the sliced checkpoint") from None


def _ops(names: list[str], shape: Callable[[str], tuple[int, ...]], prefix: str, plan: LayerPlan) -> dict[str, _Op]:
    new_index = {old: new for new, old in enumerate(plan.kept)}
    P, n = plan.per_layer_dim, plan.source_layers
    ops: dict[str, _Op] = {}
    for name in names:
        m = _LAYER.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if m:
            old, rest = int(m.group(1)), m.group(2)
            if old >= n:
                raise MatformerError(f"{name}: layer {old} is past the config's {n} layers")
            if old not in new_index:
                continue  # a skipped layer: every weight of it goes
            new = new_index[old]
            d = plan.ffn_dims[new]
            kind = {"mlp.gate_proj.weight": "rows", "mlp.up_proj.weight": "rows", "mlp.down_proj.weight": "cols"}.get(rest, "copy")
            ops[f"{prefix}layers.{new}.{rest}"] = _Op(name, kind, d) if kind != "copy" else _Op(name)
            continue
        if name == prefix + "embed_tokens_per_layer.weight":
            _check_blocks(name, shape(name)[1], n, P)
            ops[name] = _Op(name, "col_blocks", plan.kept, P)
        elif name == prefix + "per_layer_model_projection.weight":
            _check_blocks(name, shape(name)[0], n, P)
            ops[name] = _Op(name, "row_blocks", plan.kept, P)
        else:
            ops[name] = _Op(name)
    return ops


def _check_blocks(name: str, size: int, layers: int, per_layer: int) -> None:
    if size != layers * per_layer:
        raise MatformerError(f"{name}: {size} per-layer entries, expected {layers} layers x {per_layer}")


def slice_checkpoint(config: dict[str, Any], tensors, s: Slice) -> tuple[dict[str, Any], SlicedTensors, LayerPlan]:
    """(config.json dict, tensors) of a Gemma 3n checkpoint -> those of its slice `s`."""
    from .variants import _architecture
    from .weights import TEXT_PREFIX

    plan, new_config = plan_layers(config, s)
    prefix = TEXT_PREFIX[_architecture(config)]
    return new_config, SlicedTensors(tensors, _ops(tensors.names(), tensors.shape, prefix, plan)), plan


# --------------------------------------------------------------------------------------------
# counting and the record kept in the manifest


@dataclass(frozen=True)
class ParameterCounts:
    effective: int  # text decoder without the embedding tables (the table's figure)
    embeddings: int  # token + per-layer embedding tables (+ an untied lm_head)
    other: int  # everything outside the text decoder (vision/audio towers and embedders)

    @property
    def total(self) -> int:
        """The text decoder with its embedding tables: what the export carries."""
        return self.effective + self.embeddings


def parameter_counts(tensors, architecture: str) -> ParameterCounts:
    """Count by the rule in the module docstring, from shapes only (nothing is loaded)."""
    from .weights import TEXT_PREFIX

    prefix = TEXT_PREFIX[architecture]
    embeddings = {prefix + e for e in _EMBEDDINGS} | {"lm_head.weight"}
    effective = emb = other = 0
    for name in tensors.names():
        count = math.prod(tensors.shape(name))
        if name in embeddings:
            emb += count
        elif name.startswith(prefix):
            effective += count
        else:
            other += count
    return ParameterCounts(effective, emb, other)


def slice_record(s: Slice, plan: LayerPlan, counts: ParameterCounts, table: str | Path | None) -> dict[str, Any]:
    """provenance["matformer"] of the manifest (and matformer_slice.json of a sliced checkpoint)."""
    record: dict[str, Any] = {
        "name": s.name,
        "ffn_dims": list(plan.ffn_dims),
        "skipped_layers": sorted(set(range(plan.source_layers)) - set(plan.kept)),
        "source_layers": plan.source_layers,
        "layers": len(plan.kept),
        "effective_params": counts.effective,
        "embedding_params": counts.embeddings,
        "total_params": counts.total,
        "counting_rule": "effective = text decoder tensors of the sliced checkpoint (k/v of KV-shared layers "
                         "included when stored), without embed_tokens, embed_tokens_per_layer, lm_head; "
                         "total = effective + those embedding tables; vision/audio towers not counted",
    }
    if counts.other:
        record["non_text_params"] = counts.other
    if s.name != CUSTOM:
        record["table"] = str(table) if table is not None else DEFAULT_TABLE.name
        record["table_effective_params_b"] = s.table_effective_params_b
        record["mmlu_pt"] = s.mmlu_pt
    return record


def describe(record: dict[str, Any]) -> str:
    """One line for the command line."""
    text = (f"MatFormer slice {record['name']!r}: {record['layers']} of {record['source_layers']} layers, "
            f"effective {_b(record['effective_params'])} parameters (embedding tables excluded), "
            f"total {_b(record['total_params'])}")
    if record.get("non_text_params"):
        text += f"; vision/audio towers {_b(record['non_text_params'])} more (not sliced)"
    if record.get("mmlu_pt"):
        text += f"; table: {record['table_effective_params_b']}B effective, MMLU PT {record['mmlu_pt']}"
    return text


def _b(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n:,}"


def apply_to_export(req, config: dict[str, Any], variant, tensors):
    """make_plan's hook: (variant, tensors, provenance record or None) after the request's slice."""
    from .variants import variant_from_config

    s = resolve_slice(req.matformer, req.matformer_config, req.ffn_dims, req.skip_layers)
    if s is None:
        return variant, tensors, None
    config, tensors, plan = slice_checkpoint(config, tensors, s)
    sliced = variant_from_config(config, expected=req.variant)
    record = slice_record(s, plan, parameter_counts(tensors, sliced.architecture), req.matformer_config)
    if req.text_only:
        record.pop("non_text_params", None)  # the towers are not exported
    return sliced, tensors, record
