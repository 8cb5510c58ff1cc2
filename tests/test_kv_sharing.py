"""Gemma 3n KV sharing and the strict weight map, on the released checkpoint layout.

The released Gemma 3n checkpoints carry k_proj/v_proj/k_norm/v_norm for the KV-shared layers,
which transformers drops on load; checkpoints saved by transformers lack them. The exporter
declares them as known-unused: such a checkpoint must export and match, while any other
unexpected tensor, or a missing one, is an error that names it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from checkpoints import PROMPT_LEN, add_tensors, gemma3n_text_config, kv_shared_layers, prompt_ids, runtime_logits
from gemma_export.cli import main
from gemma_runtime import Model

RELEASED = "gemma3n_released"
PREFIX = "model.language_model."


def _index(folder):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_released_layout_carries_shared_kv_weights(tiny):
    names = _index(tiny.checkpoint(RELEASED))
    for layer in kv_shared_layers(gemma3n_text_config()):
        for part in ("k_proj", "v_proj", "k_norm", "v_norm"):
            assert f"{PREFIX}layers.{layer}.self_attn.{part}.weight" in names
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert len(set(names.values())) == 2  # sharded: the index path of the loader


def test_released_layout_exports_and_matches(tiny):
    out = tiny.export(RELEASED)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"] == "Gemma3nForConditionalGeneration"
    # layers 3, 4, 5 read the caches of layers 1 (sliding) and 2 (global): no cache of their own
    assert [c["layer"] for c in manifest["caches"]] == [0, 1, 2]
    assert [c["kind"] for c in manifest["caches"]] == ["sliding", "sliding", "global"]
    model = Model.load(out)
    names = {i.name for i in model._session.get_inputs()}
    assert {"past_key.2", "past_value.1"} <= names and not any(n.endswith((".3", ".4", ".5")) for n in names)

    prompt = prompt_ids(seed=3)
    steps = 12  # 21 + 12 positions: past the sliding window (8) of the shared sliding layers
    ours, tokens = runtime_logits(model, prompt, steps)
    ref = tiny.reference(RELEASED)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt + tokens])).logits[0].numpy()[PROMPT_LEN - 1:PROMPT_LEN + steps]
    diff = float(np.abs(ours - expected).max())
    assert diff <= 1e-4 * max(1.0, float(np.abs(expected).max())), diff


def _export_fails(folder, tmp_path, capsys) -> str:
    work = tmp_path / "work"
    work.mkdir()
    rc = main(["--checkpoint", str(folder), "--max-context", "64", "--prefill-chunk", "8", "--quiet",
               "--text-only",  # the released layout's towers are small stand-ins (tests/checkpoints.py)
               str(work / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert list(work.iterdir()) == []  # no out/, no .partial leftovers
    lines = [line for line in err.splitlines() if line.startswith("gemma-export: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", [
    PREFIX + "layers.0.mystery.weight",
    PREFIX + "layers.4.self_attn.k_bias",  # beside the declared k/v weights of a shared layer: not declared
    "model.mystery_tower.weight",
])
def test_unrelated_extra_tensor_is_named(tiny, tmp_path, capsys, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint(RELEASED), folder)
    add_tensors(folder, {name: torch.zeros(4)})
    line = _export_fails(folder, tmp_path, capsys)
    assert name in line and "no destination" in line


def test_extra_tensor_in_a_transformers_saved_checkpoint(tiny, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint("gemma3n"), folder)
    add_tensors(folder, {"model.layers.0.mystery.weight": torch.zeros(4)})
    line = _export_fails(folder, tmp_path, capsys)
    assert "model.layers.0.mystery.weight" in line


@pytest.mark.parametrize("name", [
    PREFIX + "layers.1.self_attn.k_norm.weight",  # the sliding KV producer's
    PREFIX + "altup_projections.0.weight",
    PREFIX + "embed_tokens_per_layer.weight",
])
def test_missing_tensor_is_named(tiny, tmp_path, capsys, name):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint(RELEASED), folder)
    add_tensors(folder, {}, drop=(name,))
    assert name not in _index(folder)
    line = _export_fails(folder, tmp_path, capsys)
    assert name in line and "missing" in line
