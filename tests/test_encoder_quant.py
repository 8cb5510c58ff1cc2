"""The encoders of an int4 export of the tiny multimodal Gemma 3n checkpoint (conftest.py
`multimodal`: the full-size MobileNetV5 vision tower, a tiny audio tower, random weights).

The int4 recipe (recipes.int4) quantizes the decoder to 4 bits, but its `vision` and `audio`
formats are 8-bit (ENCODER_W8: MatMulNBits bits=8, blocks of 32, symmetric, accuracy level 0) with
every Conv kernel int8 per output channel behind a DequantizeLinear (passes/convs.py). These tests
requantize the session's fp32 export with the int4 recipe (what `gemma-export --quant int4` does
after its fp32 export, once per session) and check: the ops in vision.onnx / audio.onnx against
the recipe recorded in manifest.json; the soft embeddings on a JPEG and a WAV clip against the fp32
export's encoders (cosine and max abs diff, floors set a little below what was measured); and a
generate_ids call with an image and a clip.
(test_multimodal.py's test_int8_encoders_keep_the_soft_embeddings checks the int8 recipe's
requantized encoders by cosine only; here the figures are tied to the recipe of a real export.
The export also runs int4's calibration on a Gemma 3n decoder, whose AltUp and per-layer
projections read the graph input inputs_embeds: evaluate._Runner takes those from its feeds.)

Measured 2026-12-01 (2 shared cores), int4 vs fp32 soft embeddings: vision [256, 64] cosine
0.997787 (lowest token 0.997338), max abs diff 0.237 (|fp32| max 3.37); audio [188, 64] cosine
0.999994 (lowest token 0.999895), max abs diff 0.0380 (|fp32| max 3.08). Requantizing takes
seconds beside the session's fp32 export (~60-130 s, shared with test_multimodal.py and others).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from multimodal_checkpoint import AUDIO, BOA, BOI, EOA, EOI, IMAGE, MAX_CONTEXT, NL, PREFILL_CHUNK, VOCAB

from checkpoints import BOS

# floors a little below the measured figures (module docstring); random weights, one input each
FLOORS = {"vision": {"cosine": 0.997, "row": 0.996, "max_abs": 0.3},
          "audio": {"cosine": 0.99995, "row": 0.9998, "max_abs": 0.05}}


@pytest.fixture(scope="session")
def int4_export(multimodal, tmp_path_factory):
    """(folder, seconds): the int4 export of the multimodal test checkpoint, requantized from the
    session's fp32 export: `gemma-export --quant int4` does the same (package._write_calibrated_export
    writes the fp32 export and requantizes it; test_quant_passes.py checks that both write the same
    bytes), without a second full-size vision export."""
    from gemma_export.package import requantize_export
    from gemma_export.recipes import make_recipe

    out = tmp_path_factory.mktemp("multimodal-int4") / "out"
    t = time.perf_counter()
    requantize_export(multimodal[1], out, make_recipe("int4"))
    return out, time.perf_counter() - t


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A JPEG photo-like image and a 2.5 s WAV clip (a chirp in noise), as files."""
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("encoder-quant-media")
    y, x = np.mgrid[0:360, 0:480]
    rng = np.random.default_rng(5)
    rgb = np.stack([x * 255 / 479, 128 + 110 * np.sin(x / 19.0 + y / 27.0), y * 255 / 359], -1)
    rgb = np.clip(rgb + rng.normal(0, 15, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "image.jpg", quality=90)
    t = np.arange(int(2.5 * 16_000)) / 16_000
    wave = 0.3 * np.sin(2 * np.pi * 300 * t * (1 + 0.4 * t)) + 0.05 * rng.standard_normal(t.size)
    soundfile.write(root / "clip.wav", wave.astype(np.float32), 16_000, subtype="FLOAT")
    return root / "image.jpg", root / "clip.wav"


def _weight_ops(path) -> dict:
    """Per op type, the nodes of a graph whose second input (the weight) is an initializer (a
    matrix for MatMul: the audio tower's 3-D relative-position products are not weight MatMuls)
    or, for Conv, a DequantizeLinear of one; and the MatMulNBits nodes themselves."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    found = {"MatMul": [], "Conv": [], "MatMulNBits": [], "DequantizedConv": [], "dq": dq, "inits": inits}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            found["MatMulNBits"].append(node)
        elif node.op_type in ("MatMul", "Conv") and len(node.input) > 1:
            if node.input[1] in inits and (node.op_type == "Conv" or len(inits[node.input[1]].dims) == 2):
                found[node.op_type].append(node)
            elif node.op_type == "Conv" and node.input[1] in dq:
                found["DequantizedConv"].append(node)
    return found


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("graph", ["vision", "audio"])
def test_int4_encoders_hold_the_recipe_ops(multimodal, int4_export, graph):
    """Every float weight MatMul of the fp32 graph is a MatMulNBits with the recipe's bits, block
    size and accuracy level (symmetric: no zero points), every Conv kernel an int8 tensor behind
    a per-output-channel DequantizeLinear; provenance counts them all."""
    import onnx

    from gemma_export.recipes import ENCODER_W8
    from gemma_runtime.manifest import read_manifest

    out, export_s = int4_export
    manifest = read_manifest(out)
    recipe = manifest.provenance["quant_recipe"]
    assert manifest.quant == recipe["name"] == "int4"
    fmt = recipe[graph]
    assert fmt["bits"] == 8 and fmt == {k: getattr(ENCODER_W8, k) for k in fmt}, fmt  # int4's encoders: 8-bit
    assert recipe["mlp"]["bits"] == 4  # ... while the decoder's MLP is 4-bit,
    assert recipe["calibration"] == "cpython-docs-tail"  # calibrated (the checkpoint has a tokenizer)

    ref, got = _weight_ops(multimodal[1] / f"{graph}.onnx"), _weight_ops(out / f"{graph}.onnx")
    nbits, convs = got["MatMulNBits"], got["DequantizedConv"]
    print(f"\n{graph}: int4 export {export_s:.0f} s; fp32 weight MatMuls {len(ref['MatMul'])}, Convs {len(ref['Conv'])}"
          f" -> MatMulNBits {len(nbits)}, int8 Convs {len(convs)}; float weight MatMuls/Convs left "
          f"{len(got['MatMul'])}/{len(got['Conv'])}")
    assert len(ref["MatMul"]) > 0 and len(ref["Conv"]) > 0 and not ref["MatMulNBits"]
    assert len(nbits) == len(ref["MatMul"]) and not got["MatMul"]
    assert len(convs) == len(ref["Conv"]) and not got["Conv"]
    for node in nbits:
        a = _attrs(node)
        assert (a["bits"], a["block_size"], a.get("accuracy_level", 0)) == (
            fmt["bits"], fmt["block_size"], fmt["accuracy_level"]), (node.name, a)
        assert node.domain == "com.microsoft"
        assert len(node.input) < 4 or not node.input[3], f"{node.name}: zero points on a symmetric format"
        assert got["inits"][node.input[1]].data_type == onnx.TensorProto.UINT8
    for node in convs:
        dq = got["dq"][node.input[1]]
        assert _attrs(dq)["axis"] == 0
        assert got["inits"][dq.input[0]].data_type == onnx.TensorProto.INT8, node.name
    record = manifest.provenance["encoders"][graph]
    assert record["conv"] == "int8/channel/qdq" and record["format"].startswith("int8")
    assert record["tensors"] == len(nbits) + len(convs)
    assert 0 < record["mean_rel_error"] <= record["max_rel_error"] < 0.05, record
    # vision (full size) 0.25 of its fp32 bytes; the tiny audio tower 0.50 (norms and biases stay float)
    ratio = (out / f"{graph}.data").stat().st_size / (multimodal[1] / f"{graph}.data").stat().st_size
    print(f"{graph}.data int4/fp32 bytes {ratio:.3f}")
    assert ratio < {"vision": 0.3, "audio": 0.55}[graph], ratio


@pytest.fixture(scope="module")
def models(multimodal, int4_export):
    from gemma_runtime import Model

    return Model.load(multimodal[1]), Model.load(int4_export[0])


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_int4_soft_embeddings_match_fp32(models, media, kind):
    """The int4 export's soft embeddings on a real file vs the fp32 export's (whose graphs match
    the eager model: test_multimodal.py, test_vision.py, test_audio_encoder.py)."""
    fp32, int4 = models
    item = media[0] if kind == "image" else media[1]
    encode = "encode_image" if kind == "image" else "encode_audio"
    ref = getattr(fp32._media, encode)(item).astype(np.float64)
    got = getattr(int4._media, encode)(item).astype(np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    cosine = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    rows = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    max_abs = float(np.abs(ref - got).max())
    print(f"\n{kind}: int4 vs fp32 soft embeddings {ref.shape}: cosine {cosine:.6f} (lowest row {rows.min():.6f}), "
          f"max abs diff {max_abs:.4f} (|fp32| max {np.abs(ref).max():.3f})")
    floor = FLOORS["vision" if kind == "image" else "audio"]
    assert cosine >= floor["cosine"], cosine
    assert rows.min() >= floor["row"], rows.min()
    assert max_abs <= floor["max_abs"], max_abs
    assert max_abs > 0, "the int4 encoder gives the float output (nothing quantized?)"


def test_int4_generate_with_an_image_and_a_clip(models, media):
    """generate_ids on the int4 export with one image and one clip: the requested tokens, or
    fewer ending at a stop id; both encoders loaded."""
    _, int4 = models
    ids = [BOS, 105, 30, 31, NL, BOI, *[IMAGE] * 256, EOI, NL, NL, BOA, *[AUDIO] * 188, EOA, NL, 40, 41, 106, 33]
    t = time.perf_counter()
    out = int4.generate_ids(ids, max_new_tokens=8, images=[media[0]], audio=[media[1]])
    print(f"\nint4 generate_ids (1 image, 1 clip, 8 new tokens): {time.perf_counter() - t:.1f} s, "
          f"stop {int4.last_stats.stop_reason}: {out}")
    assert set(int4.loaded_encoders) == {"vision", "audio"}
    assert 1 <= len(out) <= 8 and all(0 <= t < VOCAB for t in out), out
    stop = int4.last_stats.stop_reason
    assert (len(out), stop) == (8, "max_new_tokens") or (out[-1] in int4.manifest.tokens.stop and stop == "stop_token"), (out, stop)
