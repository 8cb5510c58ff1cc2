"""Images and audio end to end: a Gemma3nForConditionalGeneration checkpoint (tiny text and audio
configs; the vision tower full-size, mobilenetv5_300m_enc having no smaller variant, with seeded
random weights whose layer scales make every block matter) saved with save_pretrained, exported
once with both encoders, run by the runtime, and compared with the eager model's greedy tokens.

The checkpoint has no tokenizer, so prompts are built by hand as Gemma3nProcessor writes them:
"\\n\\n" boi + 256 image ids + eoi "\\n\\n", "\\n\\n" boa + 188 audio ids + eoa "\\n\\n" (here the
text ids stand in for the "\\n\\n" pieces). Its vocabulary is laid out like the released one,
scaled down: text [0, 256), vision [256, 384), audio [384, 512).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from checkpoints import BOS, EOS, PAD
from multimodal_checkpoint import (
    AUDIO,
    AUDIO_OFFSET,
    BOA,
    BOI,
    EOA,
    EOI,
    IMAGE,
    NEW_TOKENS,
    NL,
    TEXT_VOCAB,
    VISION_OFFSET,
    VOCAB,
)


@pytest.fixture(scope="module")
def built(multimodal):
    """(eager model, export folder, seconds to build/save, seconds to export), once per session."""
    return multimodal


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    y, x = np.mgrid[0:300, 0:400]
    rng = np.random.default_rng(1)
    rgb = np.stack([x * 255 / 399, y * 255 / 299, 128 + 100 * np.sin(x / 23.0) * np.cos(y / 31.0)], -1)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "image.png")
    t = np.arange(int(2.5 * 16_000)) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    return root / "image.png", (wave, 16_000)


def _prompt(images: int, clips: int) -> list[int]:
    ids = [BOS, 105, 30, 31, 32]
    for _ in range(images):
        ids += [NL, BOI, *[IMAGE] * 256, EOI, NL]
    for _ in range(clips):
        ids += [NL, BOA, *[AUDIO] * 188, EOA, NL]
    return ids + [40, 41, 42, 106, 33]


def _eager_tokens(model, out, ids, image, clip) -> list[int]:
    from gemma_runtime.audio_features import audio_features
    from gemma_runtime.image_processing import ImageProcessor

    kwargs = {}
    if image is not None:
        kwargs["pixel_values"] = torch.from_numpy(ImageProcessor.from_folder(out)(image))
    if clip is not None:
        features, mask = audio_features(*clip, padding="max_length")
        kwargs["input_features"], kwargs["input_features_mask"] = torch.from_numpy(features), torch.from_numpy(mask)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def runtime(built):
    from gemma_runtime import Model

    return Model.load(built[1])


def test_export_folder(built):
    from gemma_runtime.manifest import read_manifest

    model, out, built_s, export_s = built
    print(f"\ncheckpoint built+saved in {built_s:.0f} s, exported in {export_s:.0f} s")
    m = read_manifest(out)
    assert {"decoder", "vision", "audio"} <= set(m.graphs)
    for name in ("vision.onnx", "vision.data", "audio.onnx", "audio.data", "preprocessor_config.json"):
        assert name in m.files and (out / name).is_file()
    assert m.graphs["vision"].inputs[0].shape == (1, 3, 768, 768)
    assert m.graphs["vision"].outputs[0].shape == (1, 256, 64)
    assert [t.dtype for t in m.graphs["audio"].inputs] == ["float32", "bool"]
    assert m.graphs["audio"].outputs[0].shape == (1, 188, 64)
    t = m.tokens
    assert (t.image, t.audio, t.boi, t.eoi, t.boa, t.eoa) == (IMAGE, AUDIO, BOI, EOI, BOA, EOA)
    assert "text_only" not in m.provenance


def test_hard_token_rows_are_the_embedders_hard_path(built):
    """embed_tokens.bin rows of the vision/audio vocabularies = embed_vision/embed_audio(ids),
    unscaled, as Gemma3nModel.forward puts them into inputs_embeds; text rows keep sqrt(H)."""
    model, out, *_ = built
    table = np.fromfile(out / "embed_tokens.bin", dtype=np.float32).reshape(VOCAB, 64)
    with torch.no_grad():
        vision = model.model.embed_vision(input_ids=torch.arange(VISION_OFFSET, AUDIO_OFFSET)[None])[0].numpy()
        audio = model.model.embed_audio(input_ids=torch.arange(AUDIO_OFFSET, VOCAB)[None])[0].numpy()
        text = model.model.language_model.embed_tokens(torch.arange(0, TEXT_VOCAB)[None])[0].numpy()
    np.testing.assert_allclose(table[VISION_OFFSET:AUDIO_OFFSET], vision, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table[AUDIO_OFFSET:], audio, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table[:TEXT_VOCAB], text, rtol=1e-5, atol=1e-5)


def test_text_only_generation_does_not_load_encoders(runtime):
    ids = runtime.generate_ids([BOS, 30, 31, 32, 33], max_new_tokens=4)
    assert len(ids) >= 1
    assert runtime.loaded_encoders == ()


@pytest.mark.parametrize("images, clips", [(1, 0), (0, 1), (1, 1)], ids=["image", "audio", "image+audio"])
def test_greedy_tokens_match_eager(built, runtime, media, images, clips):
    model, out, *_ = built
    image, clip = media
    ids = _prompt(images, clips)
    t = time.perf_counter()
    ours = runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, images=[image] * images, audio=[clip] * clips)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = _eager_tokens(model, out, ids, image if images else None, clip if clips else None)
    print(f"\n{images} image(s) {clips} clip(s): runtime {ours_s:.1f} s, eager {time.perf_counter() - t:.1f} s")
    assert ours == ref
    assert len(ours) == NEW_TOKENS or ours[-1] == EOS


def test_media_rows_never_reused(runtime, media):
    """A call with other media after one with media (same placeholder ids) must not keep the
    first call's rows: it gives what a fresh model gives."""
    _, clip = media
    other = (np.roll(clip[0], 7_000) * 0.5, clip[1])
    ids = _prompt(0, 1)
    runtime.reset()
    fresh = runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, audio=[other])
    runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, audio=[clip], reuse_cache=True)
    again = runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, audio=[other], reuse_cache=True)
    assert runtime.last_stats.reused_tokens == 0
    assert again == fresh
    # and a text call after a media call prefills from scratch too
    runtime.generate_ids(ids[:5], max_new_tokens=2, reuse_cache=True)
    assert runtime.last_stats.reused_tokens == 0


def test_placeholder_count_mismatch(runtime, media):
    from gemma_runtime.multimodal import MediaError

    image, clip = media
    with pytest.raises(MediaError, match="1 image placeholder run.*but 0 image"):
        runtime.generate_ids(_prompt(1, 0), max_new_tokens=1)
    with pytest.raises(MediaError, match="1 image placeholder run.*but 2 image"):
        runtime.generate_ids(_prompt(1, 0), max_new_tokens=1, images=[image, image])
    with pytest.raises(MediaError, match="0 audio placeholder run.*but 1 audio"):
        runtime.generate_ids(_prompt(1, 0), max_new_tokens=1, images=[image], audio=[clip])
    short = [BOS, 30, BOI, *[IMAGE] * 100, EOI, 31]
    with pytest.raises(MediaError, match="must hold 256 ids.*100"):
        runtime.generate_ids(short, max_new_tokens=1, images=[image])


def test_unreadable_media(runtime, media, tmp_path):
    from gemma_runtime import GemmaRuntimeError

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(GemmaRuntimeError, match="cannot read image"):
        runtime.generate_ids(_prompt(1, 0), max_new_tokens=1, images=[broken])
    with pytest.raises(GemmaRuntimeError, match="silent"):
        runtime.generate_ids(_prompt(0, 1), max_new_tokens=1, audio=[(np.zeros(16_000, np.float32), 16_000)])
    with pytest.raises(GemmaRuntimeError, match="30 s"):
        runtime.generate_ids(_prompt(0, 1), max_new_tokens=1, audio=[(np.full(31 * 16_000, 0.1, np.float32), 16_000)])
    # a failed call leaves the model usable
    assert runtime.generate_ids([BOS, 30, 31], max_new_tokens=2)


def test_chat_expansion_matches_the_processor():
    from gemma_runtime.multimodal import expand_placeholders

    names = {"image": "<image_soft_token>", "audio": "<audio_soft_token>", "boi": "<start_of_image>",
             "eoi": "<end_of_image>", "boa": "<start_of_audio>", "eoa": "<end_of_audio>"}
    text = "<start_of_turn>user\n<image_soft_token><audio_soft_token>Hi<end_of_turn>\n"
    got = expand_placeholders(text, names, {"image": 256, "audio": 188})
    want = ("<start_of_turn>user\n\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
            "\n\n<start_of_audio>" + "<audio_soft_token>" * 188 + "<end_of_audio>\n\nHi<end_of_turn>\n")
    assert got == want


def test_chat_parts_expand_like_the_processor(runtime, media):
    """Model.chat's image/audio parts: the template's soft token becomes the processor's run."""
    image, clip = media
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "audio", "audio": clip},
                                             {"type": "text", "text": "w40 w41"}]}]
    ids = runtime.chat_ids(messages)
    start = ids.index(BOI)
    assert ids[start - 1] == NL and ids[start + 1 : start + 257] == [IMAGE] * 256 and ids[start + 257 : start + 259] == [EOI, NL]
    start = ids.index(BOA)
    assert ids[start - 1] == NL and ids[start + 1 : start + 189] == [AUDIO] * 188 and ids[start + 189 : start + 191] == [EOA, NL]
    assert ids.count(IMAGE) == 256 and ids.count(AUDIO) == 188
    # generation through chat (audio only: the vision tower costs seconds per image on CPU)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "w40"}]}]
    text = runtime.chat(messages, max_new_tokens=4, temperature=0)
    new = runtime.generate_ids(runtime.chat_ids(messages), max_new_tokens=4, audio=[clip])
    assert text == runtime.decode([t for t in new if t != EOS])
    with pytest.raises(Exception, match="0 audio"):
        runtime.chat([{"role": "user", "content": "w40 <audio_soft_token> w41"}], max_new_tokens=1)


def test_gemma_run_with_audio(built, media, tmp_path, capsys):
    import soundfile

    from gemma_runtime.cli import main

    _, clip = media
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, clip[0], clip[1])
    assert main([str(built[1]), "--audio", str(wav), "--max-new-tokens", "3", "--temperature", "0", "w40 w41"]) == 0
    capsys.readouterr()
    assert main([str(built[1]), "--image", str(tmp_path / "missing.png"), "w40"]) == 2
    assert "image file not found" in capsys.readouterr().err


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int8_encoders_keep_the_soft_embeddings(built, runtime, media, tmp_path):
    """The int8 recipe rewrites both encoders (MatMulNBits 8-bit MatMuls, int8 per-channel Conv
    kernels): a quarter of the vision weights on disk, and soft embeddings within cosine 0.995 of
    fp32. Random weights are a weaker check than the released ones (no outlier channels); the
    figures on real photos and speech are in bench/vision_latency.py and bench/audio_latency.py."""
    from gemma_export.package import requantize_export
    from gemma_export.recipes import make_recipe
    from gemma_runtime import Model

    _, out, *_ = built
    image, clip = media
    manifest = requantize_export(out, tmp_path / "int8", make_recipe("int8"))
    encoders = manifest.provenance["encoders"]
    assert encoders["vision"]["format"].startswith("int8") and encoders["audio"]["conv"] == "int8/channel/qdq"
    assert (tmp_path / "int8" / "vision.data").stat().st_size < 0.3 * (out / "vision.data").stat().st_size
    quantized = Model.load(tmp_path / "int8")
    for kind, item in (("image", image), ("audio", clip)):
        encode = "encode_image" if kind == "image" else "encode_audio"
        ref, got = getattr(runtime._media, encode)(item), getattr(quantized._media, encode)(item)
        assert got.shape == ref.shape
        assert _cosine(ref, got) >= 0.995, kind
        assert _cosine(ref, got) < 1 - 1e-7, f"{kind}: the int8 graph gives the float output (nothing quantized?)"
