"""Execution providers (names, defaults, missing or failing ones) and the optimized-graph cache."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import onnxruntime as ort
import pytest

import gemma_runtime.providers as providers
from gemma_runtime import InvalidArgumentError, Model, ProviderError
from gemma_runtime.errors import ProviderFallbackWarning
from gemma_runtime.providers import PROVIDERS, resolve_provider
from gemma_runtime.session_cache import graph_cache_key
from test_runtime_model import BOS, Fake, tokenizer

MISSING = [p for p in PROVIDERS.values() if not providers.is_available(p)]


def test_names_and_default_from_target():
    assert resolve_provider(None, "cpu") == "CPUExecutionProvider"
    assert resolve_provider("cpu", "qnn") == "CPUExecutionProvider"  # explicit beats the target
    assert resolve_provider("CPUExecutionProvider", "cpu") == "CPUExecutionProvider"
    with pytest.raises(ProviderError, match="target 'toaster' names no known execution provider"):
        resolve_provider(None, "toaster")
    with pytest.raises(ProviderError, match="unknown execution provider 'tpu'; use one of cpu, cuda"):
        resolve_provider("tpu", "cpu")


@pytest.mark.parametrize("provider", MISSING, ids=[p.name for p in MISSING])
def test_missing_provider_names_the_package(provider):
    if provider.plugin is not None and providers._plugin_module(provider) is not None:
        # installed, but it offers no device here (the OpenVINO plugin on a non-Intel machine)
        with pytest.raises(ProviderError, match=f"{provider.package} is installed but offers no device"):
            resolve_provider(provider.name, "cpu")
        return
    with pytest.raises(ProviderError, match=f"'{provider.name}'.*not in the installed onnxruntime.*install "
                                            f"{provider.package.split()[0]}"):
        resolve_provider(provider.name, "cpu")
    if provider.name == "qnn":  # a target's default provider is checked the same way
        with pytest.raises(ProviderError, match="onnxruntime-qnn"):
            resolve_provider(None, "qnn-x-elite")


def only_cpu(monkeypatch):
    """This onnxruntime as a plain CPU build, whatever is installed here."""
    monkeypatch.setattr(providers, "is_available", lambda p: p.name == "cpu")
    monkeypatch.setattr(providers, "_plugin_module", lambda p: None)  # no plugin package installed either


@pytest.mark.parametrize("target", ["cuda", "openvino", "dml", "coreml"])
def test_missing_preferred_provider_warns_and_takes_the_next(target, monkeypatch):
    """targets/{cuda,openvino,dml,coreml}.toml list [X, "cpu"]: without X the CPU runs, loudly."""
    only_cpu(monkeypatch)
    with pytest.warns(ProviderFallbackWarning) as record:
        assert resolve_provider(None, target, (target, "cpu")) == "CPUExecutionProvider"
    assert len(record) == 1
    message = str(record[0].message)
    assert f"'{target}' ({PROVIDERS[target].ort_name}) of the export's target '{target}' is not in the installed" in message
    assert f"install {PROVIDERS[target].package} to use it" in message and "runs on 'cpu'" in message
    with pytest.raises(ProviderError, match=f"'{target}'.*not in the installed onnxruntime"):
        resolve_provider(target, target, (target, "cpu"))  # asked for by name: an error, never a fallback


def test_fallback_names_every_skipped_provider_and_none_when_first_is_there(monkeypatch):
    only_cpu(monkeypatch)
    with pytest.warns(ProviderFallbackWarning, match=r"'qnn' \(QNNExecutionProvider\), 'cuda' "
                                                     r"\(CUDAExecutionProvider\) of the export's target 'x' are not"):
        assert resolve_provider(None, "x", ("qnn", "cuda", "cpu")) == "CPUExecutionProvider"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_provider(None, "cpu", ("cpu", "cuda")) == "CPUExecutionProvider"
        assert resolve_provider("cpu", "cuda", ("cuda", "cpu")) == "CPUExecutionProvider"


def cuda_target_export(tmp_path):
    """A Fake text export whose manifest says target cuda, providers [cuda, cpu]."""
    out = Fake(vocab=tokenizer().get_vocab_size(), stop=(1,), seed=2).write(tmp_path / "out", tokenizer=tokenizer())
    raw = json.loads((out / "manifest.json").read_text())
    raw.update(target="cuda", providers=["cuda", "cpu"])
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def test_model_load_warns_once_and_runs_on_cpu(tmp_path, monkeypatch):
    only_cpu(monkeypatch)
    out = cuda_target_export(tmp_path)
    with pytest.warns(ProviderFallbackWarning, match="install onnxruntime-gpu") as record:
        model = Model.load(out)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's Model.load
    assert model.provider == "CPUExecutionProvider" and model.generate_ids([BOS, 4, 5], max_new_tokens=3)


def test_cli_fallback_warning_is_one_line(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = cuda_target_export(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "gemma_runtime.cli", str(out), "ab", "--max-new-tokens", "3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gemma-run: warning: execution provider 'cuda'")
    assert "install onnxruntime-gpu" in proc.stderr and "--provider cpu" in proc.stderr
    assert proc.stdout.strip()  # and it answered
    quiet = subprocess.run([sys.executable, "-m", "gemma_runtime.cli", str(out), "ab", "--max-new-tokens", "3",
                            "--provider", "cpu"], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == proc.stdout
    failed = subprocess.run([sys.executable, "-m", "gemma_runtime.cli", str(out), "ab", "--provider", "cuda"],
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and "onnxruntime-gpu" in failed.stderr


def test_cli_missing_provider_is_one_line(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = Fake().write(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "gemma_runtime.cli", str(out), "hi", "--provider", "cuda"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("gemma-run: error: ") and "onnxruntime-gpu" in proc.stderr


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_that_fails_to_initialize_is_not_a_silent_cpu_fallback(tmp_path, monkeypatch):
    """onnxruntime lists a provider whose libraries then fail to load and runs on CPU with a
    warning; the runtime refuses that session."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    out = Fake().write(tmp_path / "out")
    real = ort.get_available_providers()
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: [*real, "CUDAExecutionProvider"])
    with pytest.raises(ProviderError, match="'CUDAExecutionProvider' failed to initialize"):
        Model.load(out, provider="cuda")


def test_threads_must_be_positive(tmp_path):
    out = Fake().write(tmp_path / "out")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="threads must be a positive integer"):
            Model.load(out, threads=bad)
    assert Model.load(out, threads=1).provider == "CPUExecutionProvider"


def test_optimized_graph_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GEMMA_RUNTIME_CACHE_DIR", str(cache))
    fake = Fake(seed=5)
    out = fake.write(tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    first = Model.load(out, graph_cache=True)
    assert first.session_source == "graph, optimized graph saved"
    entries = [p for p in (cache / "graphs").iterdir()]
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file() and (entries[0] / "done").is_file()
    second = Model.load(out, graph_cache=True)
    assert second.session_source == "cached optimized graph"
    prompt = [BOS, 3, 9, 4, 11, 6, 7]
    want = fake.generate(prompt, 6)[0]
    assert first.generate_ids(prompt, max_new_tokens=6) == want == second.generate_ids(prompt, max_new_tokens=6)
    assert Model.load(out).session_source == "graph"  # off by default
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written into the export folder
    # a damaged cache entry is rebuilt, with a warning
    (entries[0] / "model.onnx").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unusable"):
        third = Model.load(out, graph_cache=True)
    assert third.session_source == "graph, optimized graph saved"
    assert third.generate_ids(prompt, max_new_tokens=6) == want
    # the key changes with the graph, the weights and the provider
    keys = {graph_cache_key("a", "b", "CPUExecutionProvider"), graph_cache_key("a2", "b", "CPUExecutionProvider"),
            graph_cache_key("a", "b2", "CPUExecutionProvider"), graph_cache_key("a", "b", "CUDAExecutionProvider")}
    assert len(keys) == 4


def _ov_device(name: str):
    from types import SimpleNamespace

    return SimpleNamespace(ep_metadata={"ov_device": name}, device=SimpleNamespace(vendor="Intel"))


def test_openvino_takes_one_device_by_name(monkeypatch):
    """The OpenVINO plugin offers a device per OpenVINO device; the runtime takes the CPU, or the
    one GEMMA_OPENVINO_DEVICE names, and an absent one is an error naming those offered."""
    ov = PROVIDERS["openvino"]
    offered = [_ov_device("CPU"), _ov_device("GPU"), _ov_device("NPU")]
    monkeypatch.delenv(providers.OPENVINO_DEVICE_ENV, raising=False)
    assert providers._chosen_devices(ov, offered) == [offered[0]]
    monkeypatch.setenv(providers.OPENVINO_DEVICE_ENV, "gpu")
    assert providers._chosen_devices(ov, offered) == [offered[1]]
    monkeypatch.setenv(providers.OPENVINO_DEVICE_ENV, "VPU")
    with pytest.raises(ProviderError, match="GEMMA_OPENVINO_DEVICE=VPU: OpenVINO offers no such device here "
                                            r"\(it offers CPU, GPU, NPU\)"):
        providers._chosen_devices(ov, offered)
    qnn = PROVIDERS["qnn"]
    assert providers._chosen_devices(qnn, offered) == offered  # other plugins: every device they offer


def test_an_installed_plugin_without_devices_says_why(monkeypatch):
    """onnxruntime-ep-openvino on a machine without Intel devices registers and offers nothing:
    the error says so, and names the vendors this machine has (not 'pip install' what is installed)."""
    from types import SimpleNamespace

    ov = PROVIDERS["openvino"]
    monkeypatch.setattr(providers, "_plugin_module", lambda p: SimpleNamespace() if p is ov else None)
    monkeypatch.setattr(providers, "_plugin_devices", lambda p: [])
    monkeypatch.setattr(providers.ort, "get_ep_devices",
                        lambda: [SimpleNamespace(device=SimpleNamespace(vendor="AMD"))])
    # on an Intel machine an earlier test may have registered the real plugin, which then lists
    # itself among onnxruntime's available providers
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="onnxruntime-ep-openvino is installed but offers no device: its plugin "
                                            "takes Intel CPUs, GPUs and NPUs only, and this machine's devices are AMD"):
        resolve_provider("openvino", "openvino")
    with pytest.warns(ProviderFallbackWarning, match=r"\(onnxruntime-ep-openvino is installed but offers no device"):
        assert resolve_provider(None, "openvino", ("openvino", "cpu")) == "CPUExecutionProvider"
