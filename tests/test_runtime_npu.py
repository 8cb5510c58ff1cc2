"""The runtime on NPU exports (gemma-export --target qnn-htp): static prefill/decode QDQ graphs.

References: the exporter's torch functions for the host inputs (model/layers.py rope_tables and
attention_masks, the CPU graph's own), the exporter's NpuDriver (built from the Variant, not from
the manifest) over onnxruntime CPU sessions of the same graphs, and for the QNN HTP provider the
runtime's own CPU-provider run (random tiny models have nearly flat logits, so HTP and CPU are
compared by KL divergence, as tests/test_qnn.py does). The exports are tests/npu_exports.py's,
shared with tests/test_qnn.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import checkpoints
import npu_exports
from conftest import PREFILL_CHUNK
from gemma_export.checkpoint import open_checkpoint
from gemma_export.model.layers import attention_masks, rope_tables
from gemma_export.model.npu_text import KINDS, layer_kinds, npu_inputs_spec
from gemma_export.npu_driver import NpuDriver
from gemma_export.variants import NAMED_VARIANTS, variant_from_config
from gemma_runtime import Model, ProviderError
from gemma_runtime.cli import main as gemma_run
from gemma_runtime.integrity import sha256_file
from gemma_runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest
from gemma_runtime.npu_decoder import NpuModel, load_model
from gemma_runtime.npu_inputs import host_inputs

# a sliding ring (= the chunk), global-only MQA, and the tiny Gemma 3n (per-layer inputs, KV
# sharing), as in tests/test_qnn.py (its export is shared with that file: tests/npu_exports.py)
FAMILIES = ("gemma3_sw8", "gemma", "gemma3n")
QNN = "QNNExecutionProvider"
COS_SIN_ATOL = 6e-8  # one float32 step at 1: the runtime's cos/sin (float64, rounded) against torch's float32 ones


@pytest.fixture(scope="module")
def npu_export(tiny, tmp_path_factory):
    """family -> (export folder, folder of its float prefill/decode graphs): tests/npu_exports.py's,
    shared with tests/test_qnn.py."""
    return lambda family: npu_exports.npu_export(tiny, tmp_path_factory, family)


# ---- host inputs ------------------------------------------------------------------------------


def _tiny_variant(family: str):
    config = checkpoints._config(family).to_dict()
    config["architectures"] = [checkpoints._model_class(family).__name__]
    return variant_from_config(config)


def _torch_host_inputs(variant, max_context: int, position: int, valid: int, chunk: int) -> dict[str, np.ndarray]:
    """The host inputs as the exporter computed them before the runtime had them (npu_host.py):
    layers.py's torch functions, masks made additive."""
    pos = torch.tensor([position], dtype=torch.int64)
    positions = (pos + torch.arange(chunk, dtype=torch.int64)).to(torch.float32)
    out = {}
    for t in layer_kinds(variant):
        cos, sin = rope_tables(variant, t, positions)
        out[f"cos.{KINDS[t]}"], out[f"sin.{KINDS[t]}"] = cos.numpy(), sin.numpy()
        length = variant.cache_length(next(i for i in variant.cache_layers if variant.layer_types[i] == t), max_context)
        past, new = attention_masks(variant, t, length, pos, chunk)
        out[f"mask_past.{KINDS[t]}"] = np.where(past.numpy(), 0.0, -100.0).astype(np.float32)
        out[f"mask_new.{KINDS[t]}"] = np.where(new.numpy(), 0.0, -100.0).astype(np.float32)
    last = np.zeros((1, 1, chunk), dtype=np.float32)
    last[0, 0, valid - 1] = 1.0
    out["last"] = last
    return out


# (variant, max_context, chunks, positions): every start position of the tiny ones (rings of 5, 8
# and 24 slots wrap many times in 64), the full-size ones around their 512-slot ring's wrap
HOST_CASES = {
    **{f: (f, 64, (PREFILL_CHUNK, 1), range(0, 64)) for f in ("gemma", "gemma3_sw5", "gemma3_sw8", "gemma3_sw24", "gemma3n")},
    "gemma3-270m": ("gemma3-270m", 1024, (64, 1), (0, 448, 449, 511, 512, 513, 960)),
    "e2b": ("e2b", 4096, (64, 1), (0, 500, 512, 1000, 4000)),
}


@pytest.mark.parametrize("case", sorted(HOST_CASES))
def test_host_inputs_equal_the_torch_reference(case):
    name, max_context, chunks, positions = HOST_CASES[case]
    variant = (variant_from_config(NAMED_VARIANTS[name].config, expected=name) if name in NAMED_VARIANTS
               else _tiny_variant(name))
    spec = npu_inputs_spec(variant, max_context)
    # through the manifest's JSON, as the runtime reads it
    raw = json.loads(json.dumps(dataclasses.asdict(spec)))
    spec = Manifest.from_dict({**_minimal_manifest(), "npu_inputs": raw}).npu_inputs
    worst = 0.0
    for chunk in chunks:
        for position in positions:
            for valid in sorted({1, (chunk + 1) // 2, chunk}):
                got = host_inputs(spec, position, valid, chunk)
                want = _torch_host_inputs(variant, max_context, position, valid, chunk)
                assert list(got) == list(want)  # the graph's input order too
                for key, value in want.items():
                    assert got[key].dtype == np.float32 and got[key].shape == value.shape, key
                    if key.startswith(("cos.", "sin.")):
                        worst = max(worst, float(np.abs(got[key] - value).max()))
                    else:
                        assert np.array_equal(got[key], value), (key, position, valid, chunk)
    assert worst <= COS_SIN_ATOL


def _minimal_manifest() -> dict:
    return dict(format_version=1, family="gemma3", variant=None, architecture="Gemma3ForCausalLM", quant="int8",
                target="qnn-htp", hidden_size=64, vocab_size=300, prefill_chunk=8, max_context=64, sliding_window=8,
                graphs={}, kv_layout="past_and_new_blocks", caches=[], tables={}, per_layer_inputs=None,
                tokens=dict(bos=2, eos=1, pad=0, stop=[1]), files={})


# ---- the decode loop against the exporter's driver (CPU provider) -------------------------------


def _cpu_sessions(folder) -> dict[str, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {g: ort.InferenceSession(str(folder / f"{g}.onnx"), options, providers=["CPUExecutionProvider"])
            for g in ("prefill", "decode")}


def _driver_greedy(folder, variant, prompt: list[int], steps: int, stop) -> tuple[list[int], np.ndarray]:
    """Greedy ids and the logits before each of them, by NpuDriver over CPU sessions."""
    sessions = _cpu_sessions(folder)
    run = lambda g, f: sessions[g].run(None, f)  # noqa: E731
    driver = NpuDriver.for_export(folder, variant)
    for first in range(0, len(prompt), driver.chunk):
        logits = driver.step(run, prompt[first:first + driver.chunk], first)
    tokens, rows = [], []
    while len(tokens) < steps:
        rows.append(logits[0])
        tokens.append(int(np.argmax(logits[0])))
        if tokens[-1] in stop:
            break
        logits = driver.step(run, tokens[-1:], len(prompt) + len(tokens) - 1)
    return tokens, np.stack(rows)


def _runtime_rows(model: Model, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Teacher-forced logits through the runtime's step: after the prompt, then after each id
    of `continuation` but the last."""
    model.reset()
    chunk = model.manifest.prefill_chunk
    for first in range(0, len(prompt), chunk):
        logits = model._step(np.asarray(prompt[first:first + chunk]), first, chunk)
    rows = [logits[0]]
    for k, token in enumerate(continuation[:-1]):
        rows.append(model._step(np.asarray([token]), len(prompt) + k, 1)[0])
    return np.stack(rows)


def _prompt(seed: int, length: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [checkpoints.BOS] + rng.integers(3, checkpoints.VOCAB, length - 1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_the_export_driver_on_cpu(family, tiny, npu_export):
    """Model-level greedy generation (chunked prefill with padding, a one-id last chunk through the
    decode graph, 24 decode steps wrapping the 8-slot ring 4 times) gives NpuDriver's tokens and logits."""
    out, _ = npu_export(family)
    variant = variant_from_config(open_checkpoint(str(tiny.checkpoint(family))).config)
    manifest = read_manifest(out)
    assert manifest.npu_inputs == npu_inputs_spec(variant, manifest.max_context)
    model = load_model(out, provider="cpu", threads=1)
    assert isinstance(model, NpuModel) and model.provider == "CPUExecutionProvider"
    assert isinstance(Model.load(out, provider="cpu", threads=1), NpuModel)  # the library's entry point too

    prompt = _prompt(3, 2 * PREFILL_CHUNK + 1)
    want, want_rows = _driver_greedy(out, variant, prompt, 24, set(manifest.tokens.stop))
    got = model.generate_ids(prompt, max_new_tokens=24)
    assert got == want
    assert model.last_stats.prompt_tokens == len(prompt) and model.last_stats.decode_tokens == len(got) - 1
    rows = _runtime_rows(model, prompt, got)
    assert np.abs(rows - want_rows).max() <= 1e-5 * max(1.0, float(np.abs(want_rows).max()))

    # sampling goes through Model's sampler: top_k=1 is greedy, a seed repeats itself
    assert model.generate_ids(prompt, max_new_tokens=6, temperature=0.8, top_k=1, seed=0) == got[:6]
    sampled = model.generate_ids(prompt, max_new_tokens=6, temperature=1.0, seed=5)
    assert sampled == model.generate_ids(prompt, max_new_tokens=6, temperature=1.0, seed=5)


def _tokenizer(vocab: int):
    """A byte-fallback BPE over the tiny vocabulary (ids 0..vocab-1 all decodable)."""
    from tokenizers import Tokenizer, decoders, models

    names = {"<pad>": checkpoints.PAD, "<eos>": checkpoints.EOS, "<bos>": checkpoints.BOS, "<unk>": 3}
    for b in range(256):
        names[f"<0x{b:02X}>"] = len(names)
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        names[ch] = len(names)
    while len(names) < vocab:
        names[f"[{len(names)}]"] = len(names)
    tok = Tokenizer(models.BPE(vocab=names, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return tok


def _copy_with(folder, dest, tokenizer=None, edit_graph=None):
    """A copy of an export folder with a tokenizer added and/or a graph changed, the manifest's
    checksums updated."""
    shutil.copytree(folder, dest)
    m = read_manifest(dest)
    names = list(m.tokenizer_files)
    if tokenizer is not None:
        tokenizer.save(str(dest / "tokenizer.json"))
        names.append("tokenizer.json")
    if edit_graph is not None:
        edit_graph(dest)
    files = {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (dest / "manifest.json").write_text(dataclasses.replace(m, files=files, tokenizer_files=tuple(names)).to_json())
    return dest


def test_an_npu_manifest_without_npu_inputs_is_refused(npu_export, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(npu_export("gemma")[0], out)
    raw = json.loads((out / MANIFEST_NAME).read_text())
    del raw["npu_inputs"]  # as an NPU export made before the runtime ran them
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="no npu_inputs .* older gemma-export: re-export it"):
        load_model(out, provider="cpu")


def test_gemma_run_generates_text(npu_export, tmp_path, capsys):
    out = _copy_with(npu_export("gemma3_sw8")[0], tmp_path / "out", tokenizer=_tokenizer(checkpoints.VOCAB))
    model = NpuModel.load(out, provider="cpu", threads=1)
    for sampling in (["--temperature", "0"], ["--temperature", "0.9", "--top-k", "40", "--seed", "1"]):
        assert gemma_run([str(out), "hello world", "--provider", "cpu", "--threads", "1", "--max-new-tokens", "12",
                          *sampling]) == 0
        printed = capsys.readouterr().out
        kwargs = {"temperature": 0.0} if len(sampling) == 2 else {"temperature": 0.9, "top_k": 40, "seed": 1}
        text = model.generate("hello world", max_new_tokens=12, **kwargs)
        assert printed == text + "\n" and text


# ---- the QNN HTP provider -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_qnn_steps_agree_with_the_cpu_run(family, npu_export):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")
    out, _ = npu_export(family)
    htp = NpuModel.load(out, threads=1)  # the target's provider: qnn
    assert htp.provider == QNN
    for session in htp.sessions.values():
        assert session.get_providers()[0] == QNN
        assert session.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    cpu = NpuModel.load(out, provider="cpu", threads=1)
    prompt = _prompt(4, PREFILL_CHUNK + 4)  # a full chunk, a padded one
    continuation = cpu.generate_ids(prompt, max_new_tokens=4)  # then decode steps on the T=1 graph
    kl = npu_exports.kl_divergence(_runtime_rows(cpu, prompt, continuation), _runtime_rows(htp, prompt, continuation))
    assert kl < 0.02  # tests/test_qnn.py's bound for the same graphs (measured 0.0003..0.004 there)
    produced = htp.generate_ids(prompt, max_new_tokens=4)
    assert 1 <= len(produced) <= 4 and all(0 <= t < checkpoints.VOCAB for t in produced)


_WITHOUT_QNN = """
import sys
sys.modules["onnxruntime_qnn"] = None  # as if onnxruntime-qnn were not installed
from gemma_runtime import ProviderError
from gemma_runtime.cli import main
from gemma_runtime.npu_decoder import NpuModel
try:
    NpuModel.load(sys.argv[1], provider="qnn")
except ProviderError as err:
    print("explicit:", err)
sys.exit(main([sys.argv[1], "hello"]))
"""


def test_qnn_not_installed_is_a_one_line_error(npu_export):
    out, _ = npu_export("gemma")
    run = subprocess.run([sys.executable, "-c", _WITHOUT_QNN, str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    explicit = run.stdout.strip()
    assert explicit.count("\n") == 0 and "'qnn'" in explicit and "install onnxruntime-qnn" in explicit
    error = run.stderr.strip()  # gemma-run with the target's default provider
    assert error.count("\n") == 0, error
    assert error.startswith("gemma-run: error: ") and "onnxruntime-qnn" in error and "--provider cpu" in error


def _add_hardmax(folder):
    """decode.onnx's logits through a Hardmax, an op the QNN HTP does not take."""
    import onnx
    from onnx import helper

    path = folder / "decode.onnx"
    model = onnx.load(str(path), load_external_data=False)  # decode.onnx.data stays as it is
    (node,) = [n for n in model.graph.node if "logits" in n.output]
    node.output[list(node.output).index("logits")] = "logits_before_hardmax"
    model.graph.node.append(helper.make_node("Hardmax", ["logits_before_hardmax"], ["logits"], name="/test/Hardmax"))
    onnx.save(model, str(path))


def test_a_graph_the_htp_cannot_take_is_a_one_line_error(npu_export, tmp_path, capsys):
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")
    out = _copy_with(npu_export("gemma")[0], tmp_path / "out", edit_graph=_add_hardmax)
    with pytest.raises(ProviderError, match=r"'qnn' .* cannot run all of decode\.onnx .*CPU fallback off.*--provider cpu") as err:
        NpuModel.load(out, provider="qnn", threads=1)
    assert "\n" not in str(err.value)
    assert gemma_run([str(out), "hello", "--threads", "1"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.count("\n") == 0 and "cannot run all of decode.onnx" in printed
    NpuModel.load(out, provider="cpu", threads=1)  # the CPU provider takes it


def test_qnn_context_cache_is_compiled_once_and_reused(npu_export, tmp_path, monkeypatch):
    """graph_cache on qnn: the first load compiles each graph into an EP context under the cache
    folder, the second opens those (no HTP compilation), and both generate what a plain load does."""
    pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn is not installed")
    import onnx

    from gemma_runtime.integrity import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    out, _ = npu_export("gemma3_sw8")
    first = NpuModel.load(out, threads=1, graph_cache=True)
    assert first.session_source == "EP context compiled and saved"
    entries = sorted((tmp_path / "cache" / "contexts").iterdir())
    assert len(entries) == 2  # prefill and decode, no staging folder left
    for entry in entries:
        ops = {n.op_type for n in onnx.load(str(entry / "model_ctx.onnx"), load_external_data=False).graph.node}
        assert ops == {"EPContext"}, ops  # the whole graph is on the HTP
    second = NpuModel.load(out, threads=1, graph_cache=True)
    assert second.session_source == "cached EP context"
    for session in second.sessions.values():
        assert session.get_providers()[0] == QNN
    plain = NpuModel.load(out, threads=1)
    assert second._media.graph_cache and not plain._media.graph_cache  # the encoders' contexts too (test_npu_encoders.py)
    rng = np.random.default_rng(3)
    for graph, session in second.sessions.items():  # compiled at the plain session's optimization level: same bits
        feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
        for got, want in zip(session.run(None, feeds), plain.sessions[graph].run(None, feeds)):
            np.testing.assert_array_equal(got, want)
    prompt = _prompt(5, PREFILL_CHUNK + 3)
    assert second.generate_ids(prompt, max_new_tokens=3) == plain.generate_ids(prompt, max_new_tokens=3)
