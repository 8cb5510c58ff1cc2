"""Execution providers (names, defaults, missing or failing ones) and the optimized-graph cache."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

import gemma_runtime.providers as providers
from gemma_runtime import InvalidArgumentError, Model, ProviderError
from gemma_runtime.providers import PROVIDERS, resolve_provider
from gemma_runtime.session_cache import graph_cache_key
from test_runtime_model import BOS, Fake

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
    with pytest.raises(ProviderError, match=f"'{provider.name}'.*not in the installed onnxruntime.*install "
                                            f"{provider.package.split()[0]}"):
        resolve_provider(provider.name, "cpu")
    if provider.name == "qnn":  # a target's default provider is checked the same way
        with pytest.raises(ProviderError, match="onnxruntime-qnn"):
            resolve_provider(None, "qnn-x-elite")


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
