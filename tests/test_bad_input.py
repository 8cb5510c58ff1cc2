"""Bad input gets exit code 2, one line naming the problem, and leaves nothing half-written.

Export side: `gemma_export.cli.main` into OUT = <fresh folder>/out; afterwards that folder must
hold no out/ and no `.out.partial-*` staging folder. Runtime side: a copy of the shared tiny export,
damaged, must fail Model.load's checksums (IntegrityError naming the file) and `gemma-run`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import add_tensors
from gemma_export.cli import main as export_main
from gemma_runtime import ContextLengthError, IntegrityError, Model
from gemma_runtime.cli import main as run_main

ERROR = "gemma-export: error: "


def export_fails(capsys, work: Path, *args: str) -> str:
    """Run gemma-export with `args` into work/out; check exit 2, a single error line and no
    leftovers beside out/; return the error line."""
    work.mkdir(exist_ok=True)
    before = sorted(p.name for p in work.iterdir())
    rc = export_main([*args, "--max-context", "64", "--prefill-chunk", "8", "--quiet", str(work / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    assert sorted(p.name for p in work.iterdir()) == before  # no out/, no .out.partial-*
    print(f"\n{lines[0]}")  # -s shows the messages users get
    return lines[0]


@pytest.fixture
def gemma_ckpt(tiny, tmp_path) -> Path:
    """A private copy of the tiny Gemma checkpoint, free to damage."""
    return Path(shutil.copytree(tiny.checkpoint("gemma"), tmp_path / "ckpt"))


@pytest.fixture
def gemma3_ckpt(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny.checkpoint("gemma3_sw24"), tmp_path / "ckpt3"))


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---- export side ------------------------------------------------------------------------------


def test_missing_checkpoint_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "checkpoint"
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(missing))
    assert str(missing) in line and "no such" in line


@pytest.mark.parametrize("variant, hub_id", [("e2b", "google/gemma-3n-E2B-it"), ("gemma-2b", "google/gemma-2b")])
def test_variant_alone_goes_to_the_hub_and_fails_clearly_offline(variant, hub_id, tmp_path, capsys, monkeypatch):
    """`--variant V` with no --checkpoint downloads V's default hub id; offline (HF_HUB_OFFLINE, an
    empty cache) that is one line naming the id and saying to pass --checkpoint, before any work."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = export_fails(capsys, tmp_path / "work", "--variant", variant)
    assert hub_id in line and "--checkpoint" in line and "cannot be reached" in line


def test_folder_without_config(gemma_ckpt, tmp_path, capsys):
    (gemma_ckpt / "config.json").unlink()
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert "config.json" in line and "missing" in line


def test_corrupt_safetensors(gemma_ckpt, tmp_path, capsys):
    weights = gemma_ckpt / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(weights.stat().st_size))
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert "model.safetensors" in line and "corrupt" in line


def test_truncated_safetensors(gemma_ckpt, tmp_path, capsys):
    weights = gemma_ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert "model.safetensors" in line and "truncated" in line


def test_unknown_architecture(gemma_ckpt, tmp_path, capsys):
    _edit_config(gemma_ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert "LlamaForCausalLM" in line and "unsupported architecture" in line


def test_variant_of_another_family(gemma3_ckpt, tmp_path, capsys):
    line = export_fails(capsys, tmp_path / "work", "--variant", "gemma-2b", "--checkpoint", str(gemma3_ckpt))
    assert "gemma-2b" in line and "Gemma3ForCausalLM" in line  # what was asked and what was found


@pytest.mark.parametrize("changes, named", [
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {
        "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1_000_000.0,
                           "original_max_position_embeddings": 64},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}, "yarn"),
    ({"hidden_activation": "relu"}, "relu"),
])
def test_unimplemented_config_field(gemma3_ckpt, tmp_path, capsys, changes, named):
    _edit_config(gemma3_ckpt, **changes)
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma3_ckpt))
    assert named in line and "not implement" in line


def test_legacy_rope_scaling_yarn_on_gemma(gemma_ckpt, tmp_path, capsys):
    _edit_config(gemma_ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert "yarn" in line


def test_unknown_quant_refused(gemma_ckpt, tmp_path, capsys):
    line = export_fails(capsys, tmp_path / "work", "--quant", "int2", "--checkpoint", str(gemma_ckpt))
    assert "--quant int2" in line and "fp32" in line


def test_wrong_tensor_shape_fails_inside_the_staging_folder(gemma_ckpt, tmp_path, capsys):
    """A shape mismatch is found while the weights load, after the staging folder beside out/
    exists: it must be removed."""
    name = "model.layers.1.mlp.up_proj.weight"
    add_tensors(gemma_ckpt, {name: torch.zeros(128, 60)})
    line = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma_ckpt))
    assert name in line and "(128, 60)" in line


def test_out_is_someone_elses_folder(gemma_ckpt, tmp_path, capsys):
    work = tmp_path / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in out.rglob("*")}
    line = export_fails(capsys, work, "--checkpoint", str(gemma_ckpt))
    assert str(out) in line and "not an export folder" in line
    after = {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in out.rglob("*")}
    assert after == before


# ---- runtime side -------------------------------------------------------------------------------


@pytest.fixture
def export_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny.export("gemma"), tmp_path / "export"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate], ids=["flipped-byte", "truncated"])
def test_damaged_decoder_data(export_copy, capsys, damage):
    Model.load(export_copy)  # intact: loads (and the check is remembered)
    damage(export_copy / "decoder.data")
    with pytest.raises(IntegrityError, match=r"decoder\.data"):
        Model.load(export_copy)
    capsys.readouterr()
    assert run_main([str(export_copy), "x"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gemma-run: error: ") and "decoder.data" in lines[0], captured.err
    assert captured.out == ""


def test_flipped_byte_with_restored_mtime(export_copy):
    """A same-size change whose modification time is put back is still caught."""
    Model.load(export_copy)
    path = export_copy / "decoder.data"
    st = path.stat()
    _flip_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match=r"decoder\.data"):
        Model.load(export_copy)


def test_prompt_longer_than_the_context(tiny):
    model = Model.load(tiny.export("gemma"))
    assert model.manifest.max_context == 64
    with pytest.raises(ContextLengthError) as info:
        model.generate_ids(list(range(3, 83)), 4)
    assert "80" in str(info.value) and "64" in str(info.value)


# ---- --calibration-media (NPU encoders) ------------------------------------------------------------


def _media_folder(root: Path, image: bool = True, audio: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if image:
        (root / "photo.jpg").write_bytes(b"\xff\xd8 not read by the checks")
    if audio:
        (root / "speech.wav").write_bytes(b"RIFF not read by the checks")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"), ("no-audio", "one audio file"), ("cpu-target", "QDQ encoder graphs"),
    ("text-model", "no vision or audio encoder"),
])
def test_calibration_media_refused_before_anything_is_written(gemma3_ckpt, tmp_path, capsys, case, words):
    media = (tmp_path / "nowhere" if case == "missing" else
             _media_folder(tmp_path / "m", audio=case != "no-audio"))
    target = [] if case == "cpu-target" else ["--target", "qnn-htp"]
    msg = export_fails(capsys, tmp_path / "work", "--checkpoint", str(gemma3_ckpt), *target, "--calibration-media", str(media))
    assert words in msg and (case == "cpu-target" or case == "text-model" or str(media) in msg), msg


def test_calibration_media_reaches_the_encoders_plan(multimodal, tmp_path):
    from gemma_export.plan import ExportRequest, make_plan

    checkpoint = multimodal[1].parent / "checkpoint"  # tests/multimodal_checkpoint.py's layout
    media = _media_folder(tmp_path / "m")
    plan = make_plan(ExportRequest(checkpoint=str(checkpoint), target="qnn-htp", calibration_media=media))
    assert plan.encoders is not None
    assert plan.calibration_media.images == (media / "photo.jpg",) and plan.calibration_media.clips == (media / "speech.wav",)
    assert str(media) in plan.calibration_media.source
