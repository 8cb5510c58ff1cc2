"""The out/ folder: graphs, host tables, tokenizer files and manifest.json, written atomically.

Everything is written into a temporary folder beside out/ and renamed at the end, so a failed or
interrupted export never leaves a half-written out/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from gemma_runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheSpec,
    GraphSpec,
    Manifest,
    PerLayerInputs,
    TensorSpec,
    TokenIds,
)

from . import __version__
from .errors import ExportError
from .graphs import OPSET, cache_length, cache_names, input_names, kv_layout, output_names, reader_names, shared_layers
from .model.text import GROUP_QUERY, TWO_BLOCK
from .host_tables import quantize_table_file, write_host_tables
from .progress import Progress
from .recipes import HostRows, Recipe, fp32
from .resources import check_resources
from .stream_export import export_streamed, write_decoder
from .targets import load_target
from .variants import SLIDING, Variant
from .weights import TensorSource

DECODER_GRAPH = "decoder.onnx"
DECODER_DATA = "decoder.data"
# onnxruntime release that first ran our opset-18 float graphs; quantized recipes raise it
# (Recipe.min_onnxruntime: MatMulNBits)
MIN_ONNXRUNTIME = "1.17"
# GroupQueryAttention's sliding_window_cache (model/gqa.py) first shipped in onnxruntime 1.29
# (its attribute is in 1.29's library, not in 1.28's): an older one cannot load the graph
KV_LAYOUT_MIN_ONNXRUNTIME = {"shared_buffer_windowed": "1.29"}
# per-tensor weight errors kept in provenance["quant_recipe"]["largest_errors"]
_REPORTED_TENSORS = 8


@dataclass(frozen=True)
class ExportPlan:
    """Everything decided before the first byte is written."""

    variant: Variant
    tensors: TensorSource
    aux_files: dict[str, Path]
    source: str
    source_hashes: dict[str, str]
    quant: str
    target: str
    max_context: int
    prefill_chunk: int
    recipe: Recipe = dataclasses.field(default_factory=fp32)
    matformer: dict | None = None  # the MatFormer slice applied (matformer.slice_record), if any
    # Gemma3nForConditionalGeneration: the checkpoint's config.json when the vision and audio
    # encoders are exported too (encoders.py); None for text models and under --text-only
    encoders: dict | None = None
    text_only: bool = False  # --text-only was asked for (recorded in provenance)
    # npu_encoders.CalibrationMedia from --calibration-media; None: $GEMMA_EXPORT_CALIBRATION_MEDIA
    # or the built-in synthetic media
    calibration_media: object | None = None
    # graph passes by name (passes/graph_passes.py) run on decoder.onnx after quantization;
    # None: the target's (targets/*.toml `passes`)
    graph_passes: tuple[str, ...] | None = None
    # the LM head is tied to the token table, whose rows a rescored 4-bit head can read
    # (recipes.HostRows; plan.py): recorded in provenance, so a requantized export can too
    tied_rows: HostRows | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def export_attention(plan: ExportPlan) -> str:
    """The attention form of the decoder graph: the target's, except under `--graph-passes none`,
    which asks for a standard-ONNX graph (GroupQueryAttention is a contrib op)."""
    wanted = load_target(plan.target).attention
    if wanted == TWO_BLOCK or not _graph_passes(plan):
        return TWO_BLOCK
    return wanted


def _graph_spec(variant: Variant, plan: ExportPlan, attention: str) -> GraphSpec:
    h, T = variant.hidden_size, "T"
    inputs = [TensorSpec("inputs_embeds", "float32", (1, T, h))]
    if variant.gemma3n:
        inputs.append(TensorSpec("per_layer_inputs", "float32", (1, T, variant.num_layers, variant.gemma3n.per_layer_dim)))
    inputs += [TensorSpec("position", "int64", (1,)), TensorSpec("valid", "int64", (1,))]
    outputs = [TensorSpec("logits", "float32", (1, variant.vocab_size))]
    for layer in variant.cache_layers:
        names = cache_names(layer, attention)
        past = (1, variant.num_kv_heads, cache_length(variant, layer, plan.max_context, attention), variant.head_dim)
        # two-block: the chunk's new rows; group-query: the whole buffer (present = past, in place)
        new = past if attention == GROUP_QUERY else (1, variant.num_kv_heads, T, variant.head_dim)
        inputs += [TensorSpec(names["past_key"], "float32", past), TensorSpec(names["past_value"], "float32", past)]
        outputs += [TensorSpec(names["new_key"], "float32", new), TensorSpec(names["new_value"], "float32", new)]
    if attention == GROUP_QUERY:  # KV-shared layers' presents: their producer's buffer
        for layer in shared_layers(variant):
            source = variant.kv_source(layer)
            past = (1, variant.num_kv_heads, cache_length(variant, source, plan.max_context, attention), variant.head_dim)
            outputs += [TensorSpec(name, "float32", past) for name in reader_names(layer)]
    assert [t.name for t in inputs] == input_names(variant) and [t.name for t in outputs] == output_names(variant, attention)
    spec = GraphSpec(file=DECODER_GRAPH, data_file=DECODER_DATA, inputs=tuple(inputs), outputs=tuple(outputs))
    return with_table_inputs(spec, plan.recipe, variant.vocab_size, h)


def with_table_inputs(spec: GraphSpec, recipe: Recipe, vocab: int, hidden: int) -> GraphSpec:
    """The decoder's spec plus the graph inputs that read a host table (table_bindings)."""
    if not table_bindings(recipe):
        return spec
    from .passes.rescore import ROWS_INPUT, SCALES_INPUT

    extra = (TensorSpec(ROWS_INPUT, "int8", (vocab, hidden)), TensorSpec(SCALES_INPUT, "float32", (vocab,)))
    return dataclasses.replace(spec, inputs=spec.inputs + extra)


def table_bindings(recipe: Recipe) -> dict[str, str]:
    """manifest.table_inputs: a rescored LM head tied to the token table reads that table's rows
    and scales (passes/rescore.py)."""
    rows = recipe.lm_head_rows
    if rows is None or not recipe.lm_head_rescore:
        return {}
    from .passes.rescore import ROWS_INPUT, SCALES_INPUT

    return {ROWS_INPUT: f"{rows.table}.data", SCALES_INPUT: f"{rows.table}.scales"}


def _caches(variant: Variant, max_context: int, attention: str = TWO_BLOCK) -> tuple[CacheSpec, ...]:
    specs = []
    for layer in variant.cache_layers:
        kind = "sliding" if variant.layer_types[layer] == SLIDING and variant.sliding_window else "global"
        readers = tuple(reader_names(i) for i in shared_layers(variant) if variant.kv_source(i) == layer)
        specs.append(CacheSpec(layer=layer, kind=kind, length=cache_length(variant, layer, max_context, attention),
                               kv_heads=variant.num_kv_heads, head_dim=variant.head_dim, **cache_names(layer, attention),
                               readers=readers if attention == GROUP_QUERY else ()))
    return tuple(specs)


def _token_ids(variant: Variant, aux_files: dict[str, Path], encoders: dict | None = None) -> TokenIds:
    """Stop ids come from generation_config.json when the checkpoint has one (Gemma's instruction
    checkpoints stop on <end_of_turn> too), else from config.json's eos."""
    stop = list(variant.eos_token_ids)
    gen_path = aux_files.get("generation_config.json")
    if gen_path is not None:
        eos = json.loads(gen_path.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            stop = list(eos) if isinstance(eos, list) else [eos]
    eos_id = variant.eos_token_ids[0] if variant.eos_token_ids else (stop[0] if stop else None)
    media = {}
    if encoders is not None:
        from .encoders import multimodal_token_ids

        media = multimodal_token_ids(encoders)
    return TokenIds(bos=variant.bos_token_id, eos=eos_id, pad=variant.pad_token_id, stop=tuple(dict.fromkeys(stop)),
                    **media)


def min_onnxruntime(recipe: Recipe, layout: str) -> str:
    """The oldest onnxruntime that runs an export of this recipe and KV layout (the runtime checks it)."""
    return max(MIN_ONNXRUNTIME, recipe.min_onnxruntime, KV_LAYOUT_MIN_ONNXRUNTIME.get(layout, MIN_ONNXRUNTIME), key=_version_key)


def _provenance(plan: ExportPlan, quant_report, encoders: dict | None = None) -> dict:
    import onnx
    import onnxruntime
    import torch

    return {
        "tool": "gemma-export",
        "tool_version": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "opset": OPSET,
        "min_onnxruntime": min_onnxruntime(plan.recipe, kv_layout(plan.variant, plan.max_context, export_attention(plan))),
        "source": plan.source,
        "source_files_sha256": plan.source_hashes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quant_recipe": _recipe_record(plan.recipe, quant_report),
        **({"matformer": plan.matformer} if plan.matformer else {}),
        **({"text_only": True} if plan.text_only else {}),
        **({"tied_lm_head": dataclasses.asdict(plan.tied_rows)} if plan.tied_rows else {}),
        **({"encoders": encoders} if encoders else {}),  # per graph: "fp32" or its format and errors
    }


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _recipe_record(recipe: Recipe, report) -> dict:
    """The recipe as data, and the weights that lost the most (relative Frobenius error)."""
    record = recipe.to_dict()
    if report:
        worst = sorted(report, key=lambda r: -r.rel_error)[:_REPORTED_TENSORS]
        record["largest_errors"] = [{"tensor": r.module, "format": r.format, "rel_error": round(r.rel_error, 6)} for r in worst]
        by_class: dict[str, list[float]] = {}
        for r in report:
            by_class.setdefault(r.tensor_class, []).append(r.rel_error)
        record["mean_rel_error"] = {c: round(sum(v) / len(v), 6) for c, v in sorted(by_class.items())}
        record["tensors"] = len(report)
    return record


@contextlib.contextmanager
def _staging_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside out/ (same filesystem, so the final rename is atomic); removed
    whatever happens unless it was moved into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_out_folder(out: Path) -> None:
    """out/ may be new, empty, or a previous export (replaced); never someone's other data."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise ExportError(f"{out} exists and is not an export folder made by gemma-export: choose another OUT")


def _move_into_place(staging: Path, out: Path) -> None:
    # mkdtemp makes a private folder; an export is meant to be copied and shared
    staging.chmod(0o755)
    for f in staging.iterdir():
        f.chmod(0o644)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def write_export(plan: ExportPlan, out: Path, progress: Progress) -> Manifest:
    if load_target(plan.target).static_shapes:  # NPU targets: static QDQ prefill/decode graphs
        from .npu_export import write_npu_export

        return write_npu_export(plan, out, progress)
    out = Path(out)
    check_out_folder(out)
    if plan.recipe.calibration is not None:
        if "tokenizer.json" in plan.aux_files:
            return _write_calibrated_export(plan, out, progress)
        # no tokenizer (random weights): nothing to calibrate on; the manifest's recipe says so
        plan = dataclasses.replace(plan, recipe=dataclasses.replace(plan.recipe, calibration=None))
    variant, attention = plan.variant, export_attention(plan)
    check_resources(variant, out.parent, plan.recipe, plan.encoders)
    with _staging_folder(out) as staging:
        # the graph is exported with no weight loaded; each weight is then read, (quantized,) written
        # and dropped in turn (stream_export.py): the float model is never held, not even once
        with progress.step("exporting the decoder graph (torch.onnx, dynamo)"):
            streamed = export_streamed(variant, plan.max_context, plan.prefill_chunk, plan.tensors, attention)
        progress.expect_weights(len(streamed.weights))
        with progress.step(f"writing {DECODER_GRAPH} + {DECODER_DATA} (recipe {plan.recipe.name}), a weight at a time"):
            report = write_decoder(streamed, staging, DECODER_GRAPH, DECODER_DATA, plan.recipe, progress.tick_weight)
            del streamed
        graph_record = _run_graph_passes(staging, _graph_passes(plan), progress)
        encoder_graphs, tables, encoders_record = write_encoders_and_tables(plan, staging, progress)
        tokenizer_files = copy_aux_files(plan, staging)
        with progress.step("hashing files"):
            files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        g = variant.gemma3n
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            family=variant.family,
            variant=variant.name,
            architecture=variant.architecture,
            quant=plan.recipe.name,
            target=plan.target,
            hidden_size=variant.hidden_size,
            vocab_size=variant.vocab_size,
            prefill_chunk=plan.prefill_chunk,
            max_context=plan.max_context,
            sliding_window=variant.sliding_window,
            graphs={"decoder": _graph_spec(variant, plan, attention), **encoder_graphs},
            kv_layout=kv_layout(variant, plan.max_context, attention),
            caches=_caches(variant, plan.max_context, attention),
            tables=tables,
            per_layer_inputs=PerLayerInputs(variant.num_layers, g.per_layer_dim, g.per_layer_vocab_size) if g else None,
            tokens=_token_ids(variant, plan.aux_files, plan.encoders),
            files=files,
            provenance={**_provenance(plan, report, encoders_record), "graph_passes": graph_record},
            tokenizer_files=tuple(tokenizer_files),
            providers=load_target(plan.target).providers,
            table_inputs=table_bindings(plan.recipe),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _move_into_place(staging, out)
    return manifest


def write_encoders_and_tables(plan: ExportPlan, staging: Path, progress: Progress) -> tuple[dict, dict, dict | None]:
    """(encoder graph specs, host tables, encoders' provenance): a multimodal checkpoint's float
    encoders (encoders.py) under the recipe's vision/audio formats, then the host tables in the
    recipe's row format, the token table carrying the encoders' hard-token rows."""
    encoder_graphs, hard_rows, encoders_record = {}, None, None
    if plan.encoders is not None:
        from .encoders import quantize_encoders, write_encoders

        encoder_graphs, hard_rows = write_encoders(plan.encoders, plan.tensors, plan.aux_files, staging, progress)
        encoders_record = quantize_encoders(staging, encoder_graphs, plan.recipe, progress)
    with progress.step(f"writing host tables ({plan.recipe.tables})"):
        tables = write_host_tables(plan.variant, plan.tensors, staging, plan.recipe.tables, embed_overrides=hard_rows)
    return encoder_graphs, tables, encoders_record


def copy_aux_files(plan: ExportPlan, staging: Path) -> tuple[str, ...]:
    """The checkpoint's tokenizer (and processor) files copied into the export; their names."""
    for name, path in sorted(plan.aux_files.items()):
        shutil.copyfile(path, staging / name)
    return tuple(sorted(plan.aux_files))


def _write_calibrated_export(plan: ExportPlan, out: Path, progress: Progress) -> Manifest:
    """A calibrated recipe needs the float model to run: the fp32 export is written beside out/
    first (temporarily: disk and memory of the float model), calibrated and requantized into out/."""
    fp32_out = out.with_name(f".{out.name}.fp32-{os.getpid()}")
    shutil.rmtree(fp32_out, ignore_errors=True)
    try:
        write_export(dataclasses.replace(plan, recipe=fp32(), quant="fp32"), fp32_out, progress)
        return requantize_export(fp32_out, out, plan.recipe, progress, record_source=False)
    finally:
        shutil.rmtree(fp32_out, ignore_errors=True)


@dataclass(frozen=True)
class Calibration:
    """What calibrating an fp32 export on a recipe's calibration text gave: the importance
    statistics (None: uncalibrated, the recipe's calibration then cleared) and what the manifest
    records. `source` and `text` name what it was measured on, so that a calibration handed to
    requantize_export is checked against the export and recipe at hand."""

    importance: dict | None
    record: dict
    source: Path
    text: tuple[str | None, int]

    def fits(self, src: Path, recipe: Recipe) -> bool:
        return self.source == Path(src).resolve() and self.text == (recipe.calibration, recipe.calibration_tokens)


def calibrate_export(src: Path, recipe: Recipe, progress: Progress | None = None) -> Calibration:
    """The per-input-channel mean x^2 of every weight MatMul of the fp32 export `src` on the
    recipe's calibration text (evaluate.calibration_ids: the tail of CPython's docs text, disjoint
    from what eval scores). Without a tokenizer, uncalibrated. One calibration serves every recipe
    of the same calibration text (requantize_export's `calibration`)."""
    progress, src = progress or Progress(enabled=False), Path(src)
    text = (recipe.calibration, recipe.calibration_tokens)
    source = src.resolve()
    if recipe.calibration is None:
        return Calibration(None, {}, source, text)
    if not (src / "tokenizer.json").is_file():
        return Calibration(None, {"calibration_skipped": "the export has no tokenizer.json"}, source, text)
    from .evaluate import calibration_ids, collect_importance

    with progress.step(f"calibrating ({recipe.calibration})"):
        ids, described = calibration_ids(src, recipe.calibration_tokens)
        return Calibration(collect_importance(src, ids), {"calibration_text": described}, source, text)


def _quantize_decoder(folder: Path, recipe: Recipe, progress: Progress, source: Path | None = None,
                      importance: dict | None = None) -> list:
    if not recipe.changes_graph:
        return []
    from .passes import quantize_decoder_files

    with progress.step(f"quantizing {DECODER_GRAPH} (recipe {recipe.name})"):
        return quantize_decoder_files(folder, DECODER_GRAPH, DECODER_DATA, recipe, source=source, importance=importance)


def _graph_passes(plan: ExportPlan) -> tuple[str, ...]:
    """--graph-passes when given, else the target's passes (targets/*.toml)."""
    return plan.graph_passes if plan.graph_passes is not None else load_target(plan.target).passes


def _run_graph_passes(folder: Path, names: Sequence[str], progress: Progress) -> dict:
    from .passes.graph_passes import apply_graph_passes

    with progress.step(f"graph passes on {DECODER_GRAPH}: {', '.join(names) or 'none'}"):
        return apply_graph_passes(folder, DECODER_GRAPH, names)


def _requantize_passes(base: Manifest, asked: Sequence[str] | None) -> tuple[str, ...]:
    """The passes a requantized decoder gets: `asked`, else those the source export ran. A pass
    cannot be undone, so `asked` must include the source's."""
    done = tuple(base.provenance.get("graph_passes", {}).get("passes", ()))
    if asked is None:
        return done
    missing = [p for p in done if p not in asked]
    if missing:
        raise ExportError(f"the source export already ran graph pass(es) {', '.join(missing)}, which requantizing "
                          "cannot undo: export the source with --graph-passes none")
    return tuple(asked)


def requantize_export(src: Path, out: Path, recipe: Recipe, progress: Progress | None = None,
                      record_source: bool = True, graph_passes: Sequence[str] | None = None,
                      calibration: Calibration | None = None) -> Manifest:
    """A quantized export made from an fp32 export folder `src` (no checkpoint, no torch): the same
    passes as `gemma-export --quant`, in seconds instead of a new torch export. Benchmarks and the
    quality tests derive their int8/int4 exports this way from one fp32 export. `calibration`
    (calibrate_export of `src` on the recipe's calibration text) saves running it again."""
    from gemma_runtime.manifest import read_manifest

    from .encoders import quantize_encoders, quantized_encoder_files

    progress = progress or Progress(enabled=False)
    src, out = Path(src), Path(out)
    base = read_manifest(src)
    if base.quant != "fp32":
        raise ExportError(f"{src} is a {base.quant} export: requantize from an fp32 export")
    check_out_folder(out)
    passes = _requantize_passes(base, graph_passes)  # None: the source's
    recipe = load_target(base.target).stores(recipe)  # as gemma-export --target does
    if calibration is None:
        calibration = calibrate_export(src, recipe, progress)
    elif not calibration.fits(src, recipe):
        raise ExportError(f"the calibration given was measured on {calibration.source} with {calibration.text}, "
                          f"not on {src} with the recipe's ({recipe.calibration}, {recipe.calibration_tokens})")
    importance = calibration.importance
    if importance is None:
        recipe = dataclasses.replace(recipe, calibration=None)
    tied = base.provenance.get("tied_lm_head")
    recipe = recipe.with_token_table_rows(HostRows(**tied) if tied else None)  # as gemma-export does
    with _staging_folder(out) as staging:
        graph = base.graphs["decoder"]
        tables = dict(base.tables)
        quantized_tables = recipe.tables != "float32"  # int8 or int4 rows (host_tables.py)
        derived = {t.file for t in tables.values()} if quantized_tables else set()
        if recipe.changes_graph:
            derived |= {graph.file, graph.data_file}
        derived |= quantized_encoder_files(base.graphs, recipe)
        for name in base.files:
            if name not in derived:
                shutil.copyfile(src / name, staging / name)
        report = _quantize_decoder(staging, recipe, progress, source=src, importance=importance)
        rewritten = recipe.changes_graph or graph_passes is not None
        graph_record = _run_graph_passes(staging, passes, progress) if rewritten else None
        encoders_record = quantize_encoders(staging, base.graphs, recipe, progress, source=src)
        if quantized_tables:
            tables = {k: quantize_table_file(staging, t, source=src, row_format=recipe.tables) for k, t in tables.items()}
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        provenance = dict(base.provenance)
        if graph_record is not None:
            provenance["graph_passes"] = graph_record
        provenance["min_onnxruntime"] = min_onnxruntime(recipe, base.kv_layout)
        provenance["quant_recipe"] = {**_recipe_record(recipe, report), **calibration.record}
        if encoders_record:
            provenance["encoders"] = encoders_record
        if record_source:
            provenance["quant_recipe"]["requantized_from"] = str(src)
        decoder = with_table_inputs(base.graphs["decoder"], recipe, base.vocab_size, base.hidden_size)
        manifest = dataclasses.replace(base, quant=recipe.name, tables=tables, files=files, provenance=provenance,
                                       graphs={**base.graphs, "decoder": decoder}, table_inputs=table_bindings(recipe))
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _move_into_place(staging, out)
    return manifest
