"""The out/ folder of an NPU target (qnn-htp): static prefill (T = chunk) and decode (T = 1) graphs,
QDQ-quantized, beside the same host tables and tokenizer files as a CPU export.

    float decoder (torch) -> npu_graphs.export_npu_decoder, T = chunk and T = 1
      -> run both on onnxruntime's CPU provider over calibration ids (npu_driver.NpuDriver):
         real text (CPython's docs, evaluate.calibration_ids) when the checkpoint has a tokenizer,
         else seeded random ids (tiny test checkpoints), and record every graph input
      -> passes/qdq.py: int8 per-channel weights, uint8/uint16 activations (the target's)
      -> prefill.onnx, decode.onnx (weights inside each: int8, so a Gemma 3 270M graph is ~0.3 GB;
         QNN shares them between the two graphs only through its own EP-context files)
    Gemma 3n multimodal checkpoints (without --text-only): vision.onnx and audio.onnx beside them,
    static QDQ graphs of npu_encoders.py, and the hard-token rows of both vocabularies in embed_tokens.bin

The graphs take host-computed rope tables, additive masks and a one-hot of the last valid row
(model/npu_text.py); the manifest's `npu_inputs` records what the host needs to compute them
(rope theta and linear factor per layer kind, cache lengths, sliding window, mask value, input
names), and the runtime computes them with gemma_runtime/npu_inputs.py (gemma_runtime/npu_decoder.py
runs the two graphs), which this exporter's calibration runs use too.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from gemma_runtime.manifest import FORMAT_VERSION, MANIFEST_NAME, GraphSpec, Manifest, PerLayerInputs, TensorSpec

from .errors import ExportError
from .graphs import output_names, save_with_external_data
from .host_tables import write_host_tables
from .model.npu_text import npu_input_names, npu_inputs_spec
from .npu_driver import NpuDriver
from .npu_graphs import export_npu_decoder
from .package import (
    ExportPlan,
    _caches,
    _move_into_place,
    _provenance,
    _sha256,
    _staging_folder,
    _token_ids,
    check_out_folder,
    copy_aux_files,
    write_encoders_and_tables,
)
from .progress import Progress
from .resources import check_resources
from .targets import Target, load_target
from .weights import load_decoder

GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
NPU_MIN_ONNXRUNTIME = "1.23"  # opset 23: RMSNormalization (CPU kernel since 1.23); 16-bit Q/DQ at opset 21
CALIBRATION_SEQUENCES = 6  # random-id sequences for checkpoints without a tokenizer
CALIBRATION_TOKENS = 512  # real-text tokens when a tokenizer is present


def _spec(file: str, model: onnx.ModelProto, data_file: str | None) -> GraphSpec:
    def tensors(values):
        return tuple(TensorSpec(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                                tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values)

    return GraphSpec(file=file, data_file=data_file, inputs=tensors(model.graph.input), outputs=tensors(model.graph.output))


def _calibration_runs(folder: Path, variant, chunk: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, continuation) pairs: prompts prefilled in chunks, continuations decoded one by one."""
    if (folder / "tokenizer.json").is_file():
        from .evaluate import calibration_ids

        ids, _ = calibration_ids(folder, CALIBRATION_TOKENS)
        step = 2 * chunk + 16  # two prefill chunks (one partial) and 16 decode steps per run
        return [(ids[i:i + 2 * chunk - 3], ids[i + 2 * chunk - 3:i + step]) for i in range(0, len(ids) - step + 1, step)]
    rng = np.random.default_rng(0)
    low = 3  # past the special ids of the tiny checkpoints (pad, eos, bos)
    return [(rng.integers(low, variant.vocab_size, chunk + 3 + s).tolist(), rng.integers(low, variant.vocab_size, 8).tolist())
            for s in range(CALIBRATION_SEQUENCES)]


def _record_feeds(float_dir: Path, folder: Path, variant, max_context: int, chunk: int, tables) -> dict[str, list]:
    import onnxruntime as ort
    from gemma_runtime.tables import HostTableReader

    sessions = {g: ort.InferenceSession(str(float_dir / f), providers=["CPUExecutionProvider"]) for g, f in GRAPH_FILES.items()}
    embed = HostTableReader.open(folder, "embed_tokens", tables["embed_tokens"])
    per_layer = None
    if variant.gemma3n:
        per_layer = HostTableReader.open(folder, "per_layer", tables["per_layer"], row0_from=variant.gemma3n.per_layer_vocab_size)
    driver = NpuDriver(variant, max_context, chunk, embed.lookup, per_layer.lookup if per_layer else None)
    recorded: dict[str, list] = {g: [] for g in GRAPH_FILES}

    def run(graph, feeds):
        recorded[graph].append(feeds)
        return sessions[graph].run(None, feeds)

    for prompt, continuation in _calibration_runs(folder, variant, chunk):
        driver.teacher_forced(run, prompt, continuation)
    return recorded


def write_npu_export(plan: ExportPlan, out: Path, progress: Progress, keep_float: Path | None = None) -> Manifest:
    """keep_float: a folder to copy the float prefill/decode graphs into (tests compare them with
    the CPU graph; an export never ships them)."""
    from .passes.qdq import qdq_quantize

    target = load_target(plan.target)
    _check(plan, target)
    if target.weights.format == "float":  # coreml: static float graphs, no QDQ
        return _write_static_float_export(plan, target, Path(out), progress)
    out = Path(out)
    check_out_folder(out)
    variant = plan.variant
    check_resources(variant, out.parent)
    with _staging_folder(out) as staging, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.float-") as tmp:
        float_dir = Path(tmp)
        with progress.step("loading weights"):
            decoder = load_decoder(variant, plan.max_context, plan.tensors)
        for graph, chunk in (("prefill", plan.prefill_chunk), ("decode", 1)):
            with progress.step(f"exporting the static {graph} graph (T = {chunk})"):
                model = export_npu_decoder(decoder, plan.max_context, chunk)
                save_with_external_data(model, float_dir, GRAPH_FILES[graph], GRAPH_FILES[graph] + ".data")
                del model
        del decoder
        encoder_graphs, hard_rows, encoders_record = {}, None, None
        if plan.encoders is not None:  # vision and audio graphs (npu_encoders.py)
            from .npu_encoders import write_npu_encoders

            encoder_graphs, hard_rows, encoders_record = write_npu_encoders(
                plan.encoders, plan.tensors, plan.aux_files, staging, progress, target.activations,
                media=plan.calibration_media)
        with progress.step("writing host tables (float32)"):
            tables = write_host_tables(variant, plan.tensors, staging, "float32", embed_overrides=hard_rows)
        tokenizer_files = copy_aux_files(plan, staging)
        if keep_float is not None:
            shutil.copytree(float_dir, keep_float, dirs_exist_ok=True)
        with progress.step("recording calibration inputs"):
            feeds = _record_feeds(float_dir, staging, variant, plan.max_context, plan.prefill_chunk, tables)
        graphs = {}
        for graph, file in GRAPH_FILES.items():
            with progress.step(f"QDQ-quantizing {file} ({target.activations} activations, int8 weights)"):
                qdq_quantize(float_dir / file, staging / file, feeds.pop(graph), target.activations, 8)
                # onnxruntime's quantizer keeps the source's external data layout: <file>.data
                data = f"{file}.data" if (staging / f"{file}.data").is_file() else None
                graphs[graph] = _spec(file, onnx.load(str(staging / file), load_external_data=False), data)
        expected = npu_input_names(variant)
        npu_inputs = npu_inputs_spec(variant, plan.max_context)
        for graph, spec in graphs.items():
            if [t.name for t in spec.inputs] != expected or [t.name for t in spec.outputs] != output_names(variant):
                raise ExportError(f"{graph}: the quantized graph's inputs/outputs differ from the NPU contract")
        graphs.update(encoder_graphs)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        provenance = _provenance(plan, None)
        provenance["min_onnxruntime"] = NPU_MIN_ONNXRUNTIME
        provenance["quant_recipe"] = {
            "name": plan.quant, "format": "qdq", "weights": "int8 per output channel, symmetric",
            "activations": target.activations, "calibration": _calibration_note(staging),
        }
        if encoders_record:
            provenance["encoders"] = encoders_record
        manifest = _manifest(plan, target, graphs, tables, files, provenance, tokenizer_files, npu_inputs)
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _move_into_place(staging, out)
    return manifest


def _manifest(plan: ExportPlan, target: Target, graphs, tables, files, provenance, tokenizer_files, npu_inputs) -> Manifest:
    variant, g = plan.variant, plan.variant.gemma3n
    return Manifest(
        format_version=FORMAT_VERSION, family=variant.family, variant=variant.name, architecture=variant.architecture,
        quant=plan.quant, target=target.name, hidden_size=variant.hidden_size, vocab_size=variant.vocab_size,
        prefill_chunk=plan.prefill_chunk, max_context=plan.max_context, sliding_window=variant.sliding_window,
        graphs=graphs, kv_layout="past_and_new_blocks", caches=_caches(variant, plan.max_context), tables=tables,
        per_layer_inputs=PerLayerInputs(variant.num_layers, g.per_layer_dim, g.per_layer_vocab_size) if g else None,
        tokens=_token_ids(variant, plan.aux_files, plan.encoders), files=files, provenance=provenance,
        tokenizer_files=tuple(tokenizer_files), providers=target.providers, npu_inputs=npu_inputs,
    )


STATIC_FLOAT_MIN_ONNXRUNTIME = "1.20"  # opset 21, no RMSNormalization


def _write_static_float_export(plan: ExportPlan, target: Target, out: Path, progress: Progress) -> Manifest:
    """The coreml target: the same static prefill/decode graphs and host inputs as an NPU export,
    in float (fp32, or fp16 weights cast to float32 in the graph: passes/matmuls.py), with every
    RMSNorm left as standard ops and the ops the CoreML provider lacks rewritten
    (passes/coreml.py). A multimodal checkpoint's encoders are the cpu target's float graphs
    (encoders.py: static already); `gemma-export check` reports the ops of theirs CoreML lacks."""
    from .check import ops_outside
    from .package import _recipe_record
    from .passes import quantize_decoder_files
    from .passes.coreml import coreml_rewrites

    check_out_folder(out)
    variant = plan.variant
    check_resources(variant, out.parent)
    with _staging_folder(out) as staging:
        with progress.step("loading weights"):
            decoder = load_decoder(variant, plan.max_context, plan.tensors)
        graphs, rewrites, report = {}, {}, []
        for graph, chunk in (("prefill", plan.prefill_chunk), ("decode", 1)):
            file = GRAPH_FILES[graph]
            with progress.step(f"exporting the static {graph} graph (T = {chunk})"):
                model, rewrites[graph] = coreml_rewrites(export_npu_decoder(decoder, plan.max_context, chunk, fuse_norms=False))
                save_with_external_data(model, staging, file, f"{file}.data")
                del model
            if plan.recipe.changes_graph:
                with progress.step(f"storing the weights of {file} (recipe {plan.recipe.name})"):
                    report = quantize_decoder_files(staging, file, f"{file}.data", plan.recipe)
            graphs[graph] = _spec(file, onnx.load(str(staging / file), load_external_data=False), f"{file}.data")
        del decoder
        encoder_graphs, tables, encoders_record = write_encoders_and_tables(plan, staging, progress)
        graphs.update(encoder_graphs)
        tokenizer_files = copy_aux_files(plan, staging)
        files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        provenance = _provenance(plan, report, encoders_record)
        provenance["min_onnxruntime"] = STATIC_FLOAT_MIN_ONNXRUNTIME
        provenance["quant_recipe"] = _recipe_record(plan.recipe, report)
        provenance["coreml_rewrites"] = rewrites
        outside = {name: ops for name, spec in graphs.items()
                   if (ops := ops_outside(onnx.load(str(staging / spec.file), load_external_data=False), target))}
        for name, ops in outside.items():  # e.g. the audio tower's masking: CumSum, Where, ...
            progress.warn(f"{name}: {sum(ops.values())} nodes are ops the {target.name} target's provider does not "
                          f"take ({', '.join(f'{op} x{n}' for op, n in ops.items())}): they will run on the CPU")
        provenance["ops_outside_target"] = outside
        manifest = _manifest(plan, target, graphs, tables, files, provenance, tokenizer_files,
                             npu_inputs_spec(variant, plan.max_context))
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        _move_into_place(staging, out)
    return manifest


def _calibration_note(folder: Path) -> str:
    if (folder / "tokenizer.json").is_file():
        return f"real text: pydoc_data.topics, last {CALIBRATION_TOKENS} tokens, prefill + decode steps"
    return f"no tokenizer: {CALIBRATION_SEQUENCES} seeded random-id sequences (recorded graph inputs)"


def _check(plan: ExportPlan, target: Target) -> None:
    if not target.static_shapes or target.weights.format not in ("qdq", "float"):
        raise ExportError(f"target {target.name} is not a static-graph target (static QDQ or float graphs)")
    if target.weights.format == "qdq" and plan.recipe.changes_graph and plan.quant != target.weights.quant:
        raise ExportError(f"target {target.name} quantizes as QDQ {target.weights.quant}, not {plan.quant}")
    if plan.prefill_chunk < 2:
        raise ExportError("an NPU export needs a prefill chunk of at least 2 (decode is its own T = 1 graph)")
