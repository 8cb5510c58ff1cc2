"""Export preconditions and the --random-weights path, on tiny shapes."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import pytest

import checkpoints
from gemma_export import resources, variants
from gemma_export.cli import main as export_main


def _leftovers(parent):
    return [p.name for p in parent.iterdir()]


def test_short_memory_is_refused_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys):
    Memory = namedtuple("Memory", "available")
    monkeypatch.setattr(resources.psutil, "virtual_memory", lambda: Memory(available=10 << 20))
    out, checkpoint = tmp_path / "out", tiny.checkpoint("gemma3_sw8")
    capsys.readouterr()  # building the checkpoint prints progress of its own
    rc = export_main(["--checkpoint", str(checkpoint), "--quiet", "--max-context", "64",
                      "--prefill-chunk", "8", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not enough memory" in err and "GiB" in err and len(err.splitlines()) == 1
    assert _leftovers(tmp_path) == []


def test_short_disk_is_refused_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: Usage(1, 1, 1024))
    out, checkpoint = tmp_path / "out", tiny.checkpoint("gemma3_sw8")
    capsys.readouterr()  # building the checkpoint prints progress of its own
    rc = export_main(["--checkpoint", str(checkpoint), "--quiet", "--max-context", "64",
                      "--prefill-chunk", "8", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not enough disk space" in err and len(err.splitlines()) == 1
    assert _leftovers(tmp_path) == []


def test_estimate_counts_every_weight(tiny):
    """The disk estimate matches the weights an fp32 export really holds: the graph's
    initializers plus the host tables (the graph's protobuf overhead aside)."""
    import onnx

    from gemma_export.checkpoint import open_checkpoint

    out = tiny.export("gemma3n")
    variant = variants.variant_from_config(open_checkpoint(tiny.checkpoint("gemma3n")).config)
    disk, memory = resources.estimate(variant)
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    initializers = sum(int(np.prod(t.dims)) * 4 for t in graph.graph.initializer)
    tables = sum(p.stat().st_size for p in out.glob("*.bin"))
    assert 0.9 * (initializers + tables) <= disk <= 1.1 * (initializers + tables)
    assert memory > disk - tables


def _tiny_config_dict(family: str) -> dict:
    config = checkpoints._config(family).to_dict()
    config["architectures"] = [checkpoints._model_class(family).__name__]
    return config


@pytest.mark.parametrize("family", ["gemma3_sw8", "gemma3n"])
def test_random_weights_export_runs(tmp_path, monkeypatch, family):
    """--random-weights builds a named variant's shape with no checkpoint; here a tiny stand-in
    named variant, so the full path (RandomTensors -> strict map -> graph -> runtime) runs fast."""
    from gemma_runtime import Model

    config = _tiny_config_dict(family)
    named = variants.NamedVariant("tiny-test", family.split("_")[0], None, config)
    monkeypatch.setitem(variants.NAMED_VARIANTS, "tiny-test", named)
    out = tmp_path / "random"
    assert export_main(["--variant", "tiny-test", "--random-weights", "--quiet", "--max-context", "64",
                        "--prefill-chunk", "8", str(out)]) == 0
    model = Model.load(out)
    assert model.manifest.variant == "tiny-test"
    ids = model.generate_ids(list(range(2, 20)), max_new_tokens=5)
    assert 1 <= len(ids) <= 5 and all(0 <= i < config["vocab_size"] for i in ids)
    if family != "gemma3n":
        return
    # the same seed gives the same weights: a second export's decoder data is identical
    out2 = tmp_path / "random2"
    assert export_main(["--variant", "tiny-test", "--random-weights", "--quiet", "--max-context", "64",
                        "--prefill-chunk", "8", str(out2)]) == 0
    assert (out / "decoder.data").read_bytes() == (out2 / "decoder.data").read_bytes()


def test_encoders_count_in_the_estimate(multimodal, tmp_path, monkeypatch):
    """A multimodal Gemma 3n export writes vision.data + audio.data too: the encoder estimate
    matches their size, and the memory check refuses what only the decoder would fit."""
    import json

    from gemma_export.encoders import encoder_estimate
    from gemma_export.recipes import make_recipe

    _, out, *_ = multimodal
    config = json.loads((out.parent / "checkpoint" / "config.json").read_text())
    disk, memory = encoder_estimate(config, None)
    files = sum((out / name).stat().st_size for name in ("vision.data", "audio.data"))
    assert 0.95 * files <= disk <= 1.1 * files
    assert memory > files
    # int8: the quantized files (about a quarter) plus, while the larger is rewritten, its float file
    assert files < encoder_estimate(config, make_recipe("int8"))[0] < 1.5 * files

    variant = variants.variant_from_config(config)
    decoder_disk, decoder_memory = resources.estimate(variant)
    Memory = namedtuple("Memory", "available")
    monkeypatch.setattr(resources.psutil, "virtual_memory", lambda: Memory(available=decoder_memory + (1 << 20)))
    resources.check_resources(variant, tmp_path)
    with pytest.raises(resources.ExportError, match="not enough memory"):
        resources.check_resources(variant, tmp_path, None, config)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(resources, "psutil", type("P", (), {"virtual_memory": staticmethod(lambda: Memory(1 << 50))}))
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: Usage(1, 1, int(decoder_disk * 1.1)))
    resources.check_resources(variant, tmp_path)
    with pytest.raises(resources.ExportError, match="not enough disk space"):
        resources.check_resources(variant, tmp_path, None, config)


def test_memory_estimate_covers_the_real_270m_export(real_270m_build):
    """The memory check's estimate against the measured peak RSS of a real export (the session's
    fp32 Gemma 3 270M, made in a child process): above it, so the check never lets through an
    export that runs out of memory, and not far above it, so it does not refuse needlessly."""
    from gemma_export.checkpoint import default_gguf_path, open_checkpoint

    out, peak = real_270m_build
    if peak is None:
        pytest.skip("GEMMA_REAL_270M_EXPORT names an existing export: no peak was measured")
    variant = variants.variant_from_config(open_checkpoint(default_gguf_path()).config)
    _, memory = resources.estimate(variant)
    print(f"\nexport peak RSS {peak / 2**20:.0f} MiB, estimate {memory / 2**20:.0f} MiB")
    assert peak <= memory <= 1.8 * peak
