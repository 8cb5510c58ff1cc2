"""The openvino target: one decoder graph (symbolic chunk) of standard ONNX ops whose weights are
int8 (or int4) codes behind opset 21's blocked DequantizeLinear, and encoders likewise.

Where it runs here. onnxruntime's OpenVINO plugin (PyPI's onnxruntime-ep-openvino) offers Intel
devices only, and this machine's CPU is an AMD EPYC: the plugin registers and offers no device.
So the graphs run in OpenVINO's own runtime (PyPI's openvino, 2026.4: the ONNX frontend and CPU
plugin that the EP wraps, of the same version), driven by the runtime's own decode step: a Model
loaded with io_binding=False whose session is swapped for an OpenVINO compiled model. The EP
itself runs in test_the_openvino_ep_runs_the_export (skipped, and said so, where it offers no
device) and in bench/openvino_provider.py, measured on the lent Intel machine.

Two OpenVINO defaults the runtime turns off or leaves (providers.OPENVINO_PROPERTIES):
- bfloat16 inference on CPUs that have it (this one does): the runtime asks for f32.
- int8 activations for int8-weight MatMuls, quantized on the fly in groups of 32
  (DYNAMIC_QUANTIZATION_GROUP_SIZE): left on, as onnxruntime's own CPU kernels do for the same
  graph (it fuses DequantizeLinear + MatMul into MatMulNBits at accuracy level 4). The exact
  comparison below turns it off on both sides (OpenVINO group size 0, onnxruntime level 1).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from checkpoints import PROMPT_LEN, prompt_ids, runtime_logits, teacher_forced_logits

ov = pytest.importorskip("openvino", reason="the test extras install openvino (OpenVINO's runtime)")

FAMILIES = ["gemma", "gemma3_sw8", "gemma3n"]
NEW_TOKENS = 32
from gemma_runtime.providers import OPENVINO_PROPERTIES  # noqa: E402

F32 = dict(OPENVINO_PROPERTIES)  # what the runtime asks the EP for
EXACT = {**F32, "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}  # float activations too


class OpenVinoSession:
    """The one method of an onnxruntime session the runtime's feed loop calls, run by OpenVINO."""

    def __init__(self, path, config: dict):
        self.model = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.model.create_infer_request()

    def run(self, outputs, feeds):
        result = self.request.infer(feeds)
        names = outputs or [o.get_any_name() for o in self.model.outputs]
        return [np.array(result[self.model.output(n)]) for n in names]


@pytest.fixture(scope="module")
def ov_export(tiny):
    return lambda family, quant: tiny.target_export(family, "openvino", quant)


def _model(out, session=None):
    from gemma_runtime import Model

    model = Model.load(out, provider="cpu", io_binding=False)
    if session is not None:
        model._session = session
    return model


def _onnxruntime_exact(out):
    """onnxruntime's CPU session of the decoder computing in float32 (no int8 activations)."""
    import onnxruntime as ort

    from gemma_export.passes.qdq import cpu_reference_options

    return ort.InferenceSession(str(out / "decoder.onnx"), cpu_reference_options(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_int8_build_is_standard_ops_with_blocked_int8_weights(family, ov_export):
    from gemma_export.check import check_export
    from gemma_export.passes.matmuls import weight_matmuls
    from gemma_runtime.manifest import read_manifest

    out, fp32 = ov_export(family, "int8"), ov_export(family, "fp32")
    manifest = read_manifest(out)
    assert (manifest.target, manifest.providers, manifest.quant) == ("openvino", ("openvino", "cpu"), "int8")
    assert manifest.provenance["min_onnxruntime"] == "1.20"  # blocked DequantizeLinear, no MatMulNBits
    recipe = manifest.provenance["quant_recipe"]
    assert {recipe[c]["storage"] for c in ("attention", "mlp", "lm_head")} == {"qdq"}
    report = check_export(out)
    decoder = report.graphs[0]
    assert decoder.name == "decoder" and not decoder.unsupported, decoder.unsupported
    assert report.ok and all(not op.startswith("com.microsoft") for op in decoder.ops)

    weights = weight_matmuls(onnx.load(str(fp32 / "decoder.onnx"), load_external_data=False))
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    # the int8 recipe keeps Gemma 3n's small `other` weights (AltUp, LAuReL, per-layer) in float32
    assert {w.tensor_class for w in weight_matmuls(model)} <= {"other"}, "a float attention/MLP/head weight is left"
    weights = [w for w in weights if w.tensor_class != "other"]
    inits = {t.name: t for t in model.graph.initializer}
    dqs = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    dequantized = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dqs]
    assert len(dequantized) == sum(len(w.nodes) for w in weights) > 0
    for node in dequantized:
        dq = dqs[node.input[1]]
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        attrs = {a.name: a.i for a in dq.attribute}
        assert q.data_type == onnx.TensorProto.INT8 and len(q.dims) == 2 and len(dq.input) == 2  # symmetric
        assert attrs == {"axis": 0, "block_size": 32} and list(scale.dims) == [-(-q.dims[0] // 32), q.dims[1]]
    assert {o.version for o in model.opset_import if o.domain == ""} == {21}
    size = lambda folder: (folder / "decoder.data").stat().st_size  # noqa: E731
    quantized = sum(4 * w.shape[0] * w.shape[1] for w in weights)  # their float32 bytes
    print(f"\n{family}: decoder.data {size(fp32)} -> {size(out)} bytes, {len(dequantized)} int8 weight MatMuls")
    assert size(out) <= size(fp32) - 0.7 * quantized  # a byte a weight (and a scale a column), not four


@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_runs_the_fp32_build_as_eager_does(family, ov_export, tiny):
    """DESIGN.md's parity budget, with OpenVINO computing each step of the runtime's loop."""
    out = ov_export(family, "fp32")
    model = _model(out, OpenVinoSession(out / "decoder.onnx", F32))
    prompt = prompt_ids()
    ours, tokens = runtime_logits(model, prompt, NEW_TOKENS)
    with torch.no_grad():
        expected = tiny.reference(family)(torch.tensor([prompt + tokens])).logits[0].float().numpy()
    expected = expected[PROMPT_LEN - 1:PROMPT_LEN + NEW_TOKENS]
    diff, scale = float(np.abs(ours - expected).max()), max(1.0, float(np.abs(expected).max()))
    print(f"\n{family} fp32 on OpenVINO vs eager: max |diff| {diff:.3g} (|ref| {scale:.3g})")
    assert diff <= 1e-4 * scale
    assert tokens == [int(t) for t in expected[:-1].argmax(-1)]


# top-1 agreement with the fp32 build a little below what was measured on 33 positions of random
# tiny weights (flat logits): float arithmetic / OpenVINO's int8 activations
TOP1_FLOORS = {"int8": (0.8, 0.75), "int4": (0.6, 0.55)}


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_openvino_runs_the_qdq_build_as_onnxruntime_runs_the_cpu_one(family, quant, ov_export, tiny, tmp_path):
    """The QDQ graph holds the codes the cpu target's MatMulNBits hold (int4: affine blocks, their
    offsets beside): in float arithmetic, OpenVINO on the openvino build, onnxruntime on the same
    graph, and onnxruntime on the cpu target's build at accuracy level 0 give the same logits
    (teacher-forced on the fp32 build's greedy ids)."""
    from gemma_export.package import requantize_export
    from gemma_export.recipes import RecipeOptions, make_recipe

    out = ov_export(family, quant)
    prompt = prompt_ids()
    fp32 = _model(ov_export(family, "fp32"))
    ids = prompt + runtime_logits(fp32, prompt, NEW_TOKENS)[1]
    reference = teacher_forced_logits(fp32, ids)
    nbits = requantize_export(tiny.export(family), tmp_path / "cpu", make_recipe(quant, RecipeOptions(accuracy_level=0)))
    assert nbits.provenance["quant_recipe"]["mlp"]["storage"] == "matmulnbits"
    cpu = teacher_forced_logits(_model(tmp_path / "cpu"), ids)
    theirs = teacher_forced_logits(_model(out, _onnxruntime_exact(out)), ids)
    ours = teacher_forced_logits(_model(out, OpenVinoSession(out / "decoder.onnx", EXACT)), ids)
    fast = teacher_forced_logits(_model(out, OpenVinoSession(out / "decoder.onnx", F32)), ids)
    scale = max(1.0, float(np.abs(theirs).max()))
    diff, to_cpu = float(np.abs(ours - theirs).max()), float(np.abs(ours - cpu).max())
    top1 = lambda a: float(np.mean(a.argmax(-1) == reference.argmax(-1)))  # noqa: E731
    print(f"\n{family} {quant}: OpenVINO vs onnxruntime max |diff| {diff:.3g}, vs the cpu target's MatMulNBits {to_cpu:.3g} "
          f"(|ref| {scale:.3g}); vs fp32: max |diff| {float(np.abs(ours - reference).max()):.3g}, top-1 {top1(ours):.0%}; "
          f"with OpenVINO's int8 activations: max |diff| {float(np.abs(fast - reference).max()):.3g}, top-1 {top1(fast):.0%}")
    assert diff <= 1e-4 * scale and to_cpu <= 1e-4 * scale
    exact_floor, fast_floor = TOP1_FLOORS[quant]
    assert top1(ours) >= exact_floor and top1(fast) >= fast_floor


def test_the_openvino_encoders_are_standard_ops_and_openvino_runs_them(built_multimodal_qdq, media_files):
    """The int8 encoders as the openvino target stores them (MatMuls as int8 DequantizeLinear +
    MatMul, Conv kernels int8 per channel): no contrib op, and OpenVINO's soft embeddings equal
    onnxruntime's (float arithmetic on both sides) and stay within cosine 0.995 of fp32."""
    from gemma_export.check import check_graph
    from gemma_export.targets import load_target

    fp32_out, qdq_out, runtime = built_multimodal_qdq
    target = load_target("openvino")
    image, clip = media_files
    for kind, graph, item in (("image", "vision", image), ("audio", "audio", clip)):
        report = check_graph(qdq_out, graph, f"{graph}.onnx", f"{graph}.data", target, ())
        assert not report.unsupported and report.ops.get("DequantizeLinear", 0) > 0, report.unsupported
        assert not any(op.startswith("com.microsoft") for op in report.ops)
        encode = "encode_image" if kind == "image" else "encode_audio"
        reference = getattr(runtime(fp32_out)._media, encode)(item)
        onnxruntime_model = runtime(qdq_out)
        onnxruntime_model._media._sessions[graph] = _encoder_exact(qdq_out / f"{graph}.onnx")
        theirs = getattr(onnxruntime_model._media, encode)(item)
        openvino_model = runtime(qdq_out)
        openvino_model._media._sessions[graph] = OpenVinoSession(qdq_out / f"{graph}.onnx", EXACT)
        ours = getattr(openvino_model._media, encode)(item)
        diff, scale = float(np.abs(ours - theirs).max()), max(1.0, float(np.abs(theirs).max()))
        cosine = float((ours * reference).sum() / (np.linalg.norm(ours) * np.linalg.norm(reference)))
        print(f"\n{graph}: OpenVINO vs onnxruntime max |diff| {diff:.3g} (|ref| {scale:.3g}); cosine to fp32 {cosine:.6f}")
        assert diff <= 1e-4 * scale
        assert 0.995 <= cosine < 1 - 1e-7


def _encoder_exact(path):
    import onnxruntime as ort

    from gemma_export.passes.qdq import cpu_reference_options

    return ort.InferenceSession(str(path), cpu_reference_options(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def built_multimodal_qdq(multimodal, tmp_path_factory):
    """(fp32 export, its encoders and decoder requantized to QDQ int8 as the openvino target
    stores them, Model.load on the CPU). The session's multimodal export is a cpu-target one: its
    decoder carries the cpu target's fusions, so only its encoders are the openvino build's."""
    from gemma_export.package import requantize_export
    from gemma_export.recipes import make_recipe
    from gemma_runtime import Model

    out = tmp_path_factory.mktemp("openvino-encoders") / "int8"
    requantize_export(multimodal[1], out, make_recipe("int8").with_storage("qdq"))
    return multimodal[1], out, lambda folder: Model.load(folder, provider="cpu", io_binding=False)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("openvino-media")
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:300, 0:400]
    rgb = np.stack([x * 255 / 399, 128 + 100 * np.sin(x / 17.0 + y / 23.0), y * 255 / 299], -1)
    Image.fromarray(np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)).save(root / "image.png")
    t = np.arange(2 * 16_000) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 250 * t * (1 + 0.5 * t)) + 0.05 * rng.standard_normal(t.size)
    soundfile.write(root / "clip.wav", wave.astype(np.float32), 16_000, subtype="FLOAT")
    return root / "image.png", root / "clip.wav"


def test_the_openvino_ep_runs_the_export(ov_export, tiny):
    """Through onnxruntime's OpenVINO plugin with its CPU fallback off: the runtime's own loop
    (IOBinding) on the int8 build gives onnxruntime's greedy tokens. Needs an Intel device."""
    from gemma_runtime import Model, ProviderError

    out = ov_export("gemma3_sw8", "int8")
    try:
        model = Model.load(out, provider="openvino")
    except ProviderError as err:
        pytest.skip(f"the OpenVINO EP cannot run here: {err}")
    assert model.provider == "OpenVINOExecutionProvider"
    prompt = prompt_ids()
    assert model.generate_ids(prompt, 16) == _model(out).generate_ids(prompt, 16)
