"""Build targets: targets/*.toml load into checked dataclasses, ship in the wheel, pick the
export's defaults, and name the providers the runtime picks from the manifest."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import warnings

import onnxruntime as ort
import pytest

from gemma_export.cli import main as export_main
from gemma_export.errors import ExportError
from gemma_export.targets import graph_pass_names, load_target, parse_target, target_names
from gemma_runtime import Model, ProviderError
from gemma_runtime.errors import ProviderFallbackWarning
from gemma_runtime.providers import PROVIDERS

REPO = Path(__file__).resolve().parent.parent
DEVICE_CLASSES = ("cpu", "cpu-arm", "cuda", "qnn-htp", "openvino", "dml", "coreml")


def _raw(name: str) -> dict:
    return tomllib.loads((REPO / "targets" / f"{name}.toml").read_text(encoding="utf-8"))


def test_every_device_class_has_a_valid_target():
    assert set(target_names()) == set(DEVICE_CLASSES)
    assert set(target_names()) == {p.stem for p in (REPO / "targets").glob("*.toml")}
    for name in target_names():
        t = load_target(name)
        assert t.providers and all(p in PROVIDERS for p in t.providers)
        assert set(t.passes) <= set(graph_pass_names())
        assert t.weights.quant in t.weights.quants and t.prefill_chunk <= t.max_context
    npu = load_target("qnn-htp")
    assert npu.providers == ("qnn",) and npu.static_shapes and npu.weights.format == "qdq"
    assert npu.activations == "uint16" and npu.decoder_graphs == ("prefill", "decode") and not npu.passes
    assert not npu.ops.allows("com.microsoft", "MatMulNBits") and npu.ops.allows("", "MatMul")
    assert not npu.ops.allows("", "Range")  # not in the QNN list
    assert load_target("cpu").ops.allows("com.microsoft", "MatMulNBits")
    cuda = load_target("cuda").ops
    assert cuda.allows("com.microsoft", "MatMulNBits") and not cuda.allows("com.microsoft", "QOrderedMatMul")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(colour="red"), "unknown field.*colour"),
    (lambda r: r.pop("providers"), "missing field 'providers'"),
    (lambda r: r.update(providers=["tpu"]), r"providers \['tpu'\] not among"),
    (lambda r: r.update(providers=[]), "providers is empty"),
    (lambda r: r.update(providers=["cpu", "cpu"]), "lists a value twice"),
    (lambda r: r.update(graphs=["decoder", "prefill", "decode"]), "either 'decoder'"),
    (lambda r: r.update(graphs=["prefill"]), "either 'decoder'"),
    (lambda r: r.update(static_shapes=True), "contradicts graphs"),
    (lambda r: r.update(passes=["no-such-pass"]), r"passes \['no-such-pass'\] not among"),
    (lambda r: r["weights"].update(format="gguf"), "weights.format"),
    (lambda r: r["weights"].update(bits=[3]), r"weights.bits \[3\]"),
    (lambda r: r["weights"].update(quant="int2"), "weights.quant 'int2' is not in"),
    (lambda r: r["weights"].update(quants=["fp32", "int3"]), "weights.quants"),
    (lambda r: r["activations"].update(dtype="uint16"), "need QDQ weights"),
    (lambda r: r["shapes"].update(max_context=64, prefill_chunk=128), "below prefill_chunk"),
    (lambda r: r["shapes"].update(prefill_chunk="128"), "prefill_chunk must be a int"),
    (lambda r: r["shapes"].update(overridable=["vocab"]), "shapes.overridable"),
    (lambda r: r["ops"].update(domains=["", "com.acme"]), "ops.domains"),
])
def test_bad_target_files_are_errors_that_name_the_field(change, message):
    raw = copy.deepcopy(_raw("cpu"))
    change(raw)
    with pytest.raises(ExportError, match=f"targets/cpu.toml.*{message}"):
        parse_target("cpu", raw)


def test_contrib_passes_need_the_contrib_domain():
    raw = copy.deepcopy(_raw("qnn-htp"))
    raw["passes"] = ["ort-fusions"]
    with pytest.raises(ExportError, match="write contrib ops"):
        parse_target("qnn-htp", raw)


def test_overrides_where_the_target_allows():
    cpu, npu = load_target("cpu"), load_target("qnn-htp")
    assert cpu.with_overrides() == ("fp32", 4096, 128)
    assert cpu.with_overrides("int4", 512, 32) == ("int4", 512, 32)
    assert npu.with_overrides(max_context=256) == ("int8", 256, npu.prefill_chunk)
    with pytest.raises(ExportError, match="fixes quant = int8: --quant int4 is not allowed"):
        npu.with_overrides(quant="int4")
    assert npu.with_overrides(quant="int8")[0] == "int8"  # the target's own value is no override
    with pytest.raises(ExportError, match="builds fp32, fp16, int4; --quant int8"):
        load_target("dml").with_overrides(quant="int8")


def test_unknown_target_is_a_clear_error(capsys):
    with pytest.raises(ExportError, match="--target toaster is not a target.*cpu-arm"):
        load_target("toaster")
    with pytest.raises(SystemExit):
        export_main(["--target", "toaster", "out"])
    assert "invalid choice: 'toaster'" in capsys.readouterr().err


def test_export_records_the_target_and_the_runtime_picks_its_provider(tiny, tmp_path):
    """--target cuda on the tiny Gemma 3: the manifest names the target and its providers; with no
    CUDA here the runtime takes the target's second choice, the CPU, with a warning naming the
    package to install, and runs the graph; --provider cuda stays an error."""
    out = tmp_path / "cuda"
    assert export_main(["--checkpoint", str(tiny.checkpoint("gemma3_sw8")), "--target", "cuda", "--quant", "fp32",
                        "--max-context", "32", "--prefill-chunk", "8", "--quiet", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["providers"] == ["cuda", "cpu"]
    assert (manifest["quant"], manifest["max_context"], manifest["prefill_chunk"]) == ("fp32", 32, 8)
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = Model.load(out)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, ProviderFallbackWarning)]
    if has_cuda:
        assert model.provider == "CUDAExecutionProvider" and fallbacks == []
    else:
        assert model.provider == "CPUExecutionProvider"
        assert len(fallbacks) == 1 and "'cuda' (CUDAExecutionProvider) of the export's target 'cuda'" in fallbacks[0]
        assert "runs on 'cpu'" in fallbacks[0] and "install onnxruntime-gpu" in fallbacks[0]
        with pytest.raises(ProviderError, match="'cuda'.*not in the installed onnxruntime.*onnxruntime-gpu"):
            Model.load(out, provider="cuda")  # asked for by name: no fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        assert Model.load(out, provider="cpu").provider == "CPUExecutionProvider"  # chosen: no warning
    reference = Model.load(tiny.export("gemma3_sw8"))  # the cpu target's export of the same weights
    assert model.generate_ids([2, 5, 6, 7], max_new_tokens=4) == reference.generate_ids([2, 5, 6, 7], max_new_tokens=4)

    # a manifest whose only provider is missing is an error naming its package, not a CPU run
    if not has_cuda:
        only = tmp_path / "cuda-only"
        shutil.copytree(out, only)
        manifest["providers"] = ["cuda"]
        (only / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ProviderError, match="none of the execution providers of target 'cuda'.*onnxruntime-gpu"):
            Model.load(only)
        assert Model.load(only, provider="cpu").provider == "CPUExecutionProvider"


def test_cpu_target_defaults_and_every_target_builds(tiny):
    manifest = json.loads((tiny.export("gemma3_sw8") / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and manifest["providers"] == ["cpu"]
    from gemma_export.plan import ExportRequest, make_plan

    from gemma_export.plan import unbuilt_features

    assert all(not unbuilt_features(load_target(name)) for name in target_names())  # every target builds
    raw = copy.deepcopy(_raw("qnn-htp"))  # static graphs of MatMulNBits weights: not a build this version has
    raw["weights"].update(format="matmulnbits", bits=[4], quant="int4", quants=["int4"])
    raw["activations"]["dtype"] = "none"
    assert unbuilt_features(parse_target("qnn-htp", raw)) == ["static prefill/decode graphs with matmulnbits weights"]
    plan = make_plan(ExportRequest(checkpoint=str(tiny.checkpoint("gemma3_sw8")), target="coreml", max_context=64, prefill_chunk=8))
    assert (plan.quant, plan.target) == ("fp16", "coreml")


def test_the_wheel_carries_every_target(tmp_path):
    """Built from a copy of the sources (no build/ left in the checkout), installed into a folder,
    and read from there: --target works from an installed wheel, not only from a checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for folder in ("gemma_export", "targets"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("gemma_export-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"gemma_export/target_files/{n}.toml" for n in DEVICE_CLASSES} <= set(names)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = ("import gemma_export, gemma_export.targets as t; "
             "print(gemma_export.__file__); print(','.join(t.target_names())); print(t.load_target('qnn-htp').providers)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    where, names_line, providers = proc.stdout.splitlines()
    assert where.startswith(str(site))
    assert set(names_line.split(",")) == set(DEVICE_CLASSES) and providers == "('qnn',)"
