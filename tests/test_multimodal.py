"""Images and audio end to end: a Gemma3nForConditionalGeneration checkpoint (tiny text and audio
configs; the vision tower full-size, mobilenetv5_300m_enc having no smaller variant, with seeded
random weights whose layer scales make every block matter) saved with save_pretrained, exported
once with both encoders, run by the runtime, and compared with the eager model's greedy tokens.

Raw prompts are built by hand as Gemma3nProcessor writes them: "\\n\\n" boi + 256 image ids + eoi
"\\n\\n", "\\n\\n" boa + 188 audio ids + eoa "\\n\\n" (NL stands in for "\\n\\n"). Chat prompts go
through transformers' own Gemma3nProcessor (multimodal_checkpoint.hf_processor, built offline from
the checkpoint's word-level tokenizer.json and preprocessor_config.json), whose output is what the
eager model is fed. Its vocabulary is laid out like the released one, scaled down: text [0, 256),
vision [256, 384), audio [384, 512).

Images are the cost: each is one full-size vision forward on either side (measured on two quiet
cores: one image ~22 s ours with the session start, ~29 s eager; two images + two clips ~31 s ours,
~37 s eager). So there are two image prompts: one image alone, and two images + two clips in one
chat prompt (the `several` fixture), whose runtime tokens the gemma-run test checks its output
against instead of running Model.chat on them again.
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


@pytest.fixture(scope="module")
def more_media(tmp_path_factory):
    """A second image and two clips as float WAV files (read back bit-exact, so gemma-run, given
    the files, sees the samples the processor is given): (image path, (clip path, clip path))."""
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("more-media")
    y, x = np.mgrid[0:480, 360:0:-1]
    rng = np.random.default_rng(2)
    rgb = np.stack([128 + 120 * np.cos(x / 17.0), y * 255 / 479, 255 - x * 255 / 360], -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "image2.jpg", quality=90)
    clips = []
    for name, seconds, hz in (("clip1.wav", 2.0, 220.0), ("clip2.wav", 3.5, 660.0)):
        t = np.arange(int(seconds * 16_000)) / 16_000
        wave = 0.25 * np.sin(2 * np.pi * hz * t * (1 + 0.3 * t)) + 0.05 * rng.standard_normal(t.size)
        soundfile.write(root / name, wave.astype(np.float32), 16_000, subtype="FLOAT")
        clips.append(root / name)
    return root / "image2.jpg", tuple(clips)


def _our_inputs(out, images, clips) -> dict:
    """The eager model's media tensors from the runtime's own pre-processing (the same pixels and
    30 s-padded features the encoders get; tests/test_image_processing.py and
    test_audio_features.py compare those with the Hugging Face processors)."""
    from gemma_runtime.audio_features import audio_features
    from gemma_runtime.image_processing import ImageProcessor

    kwargs = {}
    if images:
        processor = ImageProcessor.from_folder(out)
        kwargs["pixel_values"] = torch.from_numpy(np.concatenate([processor(image) for image in images]))
    if clips:
        features = [audio_features(*clip, padding="max_length") for clip in clips]
        kwargs["input_features"] = torch.from_numpy(np.concatenate([f for f, _ in features]))
        kwargs["input_features_mask"] = torch.from_numpy(np.concatenate([m for _, m in features]))
    return kwargs


def _eager_tokens(model, ids, **media) -> list[int]:
    ids = torch.as_tensor(ids).reshape(1, -1)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=EOS, pad_token_id=PAD, **media)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def processor(built):
    """transformers' Gemma3nProcessor for the tiny checkpoint (saved beside the export)."""
    from multimodal_checkpoint import hf_processor

    return hf_processor(built[1].parent / "checkpoint")


def _processed(processor, text: str, images=(), clips=()) -> tuple[list[int], dict]:
    """The processor's output for a rendered chat prompt (as apply_chat_template tokenizes it: no
    special tokens added, the template writes BOS), audio padded to 30 s as the encoder graph
    sees it (DESIGN.md, Vision and audio): the eager model's input ids and media tensors."""
    import soundfile
    from PIL import Image

    kwargs = {}
    if images:
        kwargs["images"] = [Image.open(path) for path in images]
    if clips:
        kwargs["audio"] = [soundfile.read(path, dtype="float32")[0] for path in clips]
        kwargs["audio_kwargs"] = {"padding": "max_length", "sampling_rate": 16_000}
    out = processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)
    media = {k: out[k] for k in ("pixel_values", "input_features", "input_features_mask") if k in out}
    return out["input_ids"][0].tolist(), media


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


@pytest.mark.parametrize("images, clips", [(1, 0), (0, 1)], ids=["image", "audio"])
def test_greedy_tokens_match_eager(built, runtime, media, images, clips):
    """All 16 tokens (no early stop); image+audio prompts: test_several_images_and_clips."""
    model, out, *_ = built
    image, clip = media
    ids = _prompt(images, clips)
    t = time.perf_counter()
    ours = runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, images=[image] * images, audio=[clip] * clips)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = _eager_tokens(model, ids, **_our_inputs(out, [image] * images, [clip] * clips))
    print(f"\n{images} image(s) {clips} clip(s): runtime {ours_s:.1f} s, eager {time.perf_counter() - t:.1f} s")
    assert ours == ref
    assert len(ours) == NEW_TOKENS and EOS not in ours, ours


def _runs(ids, token) -> list[int]:
    """Lengths of the runs of `token` in ids."""
    from gemma_runtime.multimodal import placeholder_runs

    return [n for _, n in placeholder_runs(np.array(ids), token)]


def _user_turn(images, clips, text: str) -> dict:
    """One user turn as gemma-run writes it: the images, then the clips, then the text."""
    parts = [{"type": "image", "image": p} for p in images] + [{"type": "audio", "audio": p} for p in clips]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def several(built, runtime, media, more_media, processor):
    """Two images and two clips in one chat prompt: (messages, chat_ids, processor output, runtime
    tokens, eager tokens). The one eager generate with images beyond the single-image test."""
    model, *_ = built
    images, clips = [media[0], more_media[0]], list(more_media[1])
    messages = [_user_turn(images, clips, "w40 w41")]
    ids = runtime.chat_ids(messages)
    hf_ids, hf_media = _processed(processor, runtime.render_chat(messages), images, clips)
    t = time.perf_counter()
    ours = runtime.generate_ids(ids, max_new_tokens=NEW_TOKENS, images=images, audio=clips)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = _eager_tokens(model, hf_ids, **hf_media)
    print(f"\n2 images 2 clips: runtime {ours_s:.1f} s, eager {time.perf_counter() - t:.1f} s")
    return messages, ids, (hf_ids, hf_media), ours, ref


def test_several_images_and_clips(several):
    """Two image runs and two audio runs, each filled with its own image / clip in order: the
    chat's ids are the processor's, and greedy tokens equal the eager model's for all 16."""
    messages, ids, (hf_ids, hf_media), ours, ref = several
    assert _runs(ids, IMAGE) == [256, 256] and _runs(ids, AUDIO) == [188, 188]
    assert ids == hf_ids
    assert hf_media["pixel_values"].shape[0] == 2 and hf_media["input_features"].shape[0] == 2
    assert ours == ref
    assert len(ours) == NEW_TOKENS and EOS not in ours, ours


def test_few_shot_audio_chat_matches_eager(built, runtime, more_media, processor):
    """Model.chat with an audio part in each of two user turns (an example answer between them):
    its expanded prompt ids are the processor's, which the eager model is fed; its answer is
    the eager model's 16 greedy tokens."""
    model, *_ = built
    first, second = more_media[1]
    messages = [_user_turn([], [first], "w40 w41"), {"role": "assistant", "content": "w50 w51"},
                _user_turn([], [second], "w42")]
    ids = runtime.chat_ids(messages)
    hf_ids, hf_media = _processed(processor, runtime.render_chat(messages), clips=[first, second])
    assert ids == hf_ids
    assert _runs(ids, AUDIO) == [188, 188] and _runs(ids, IMAGE) == []
    text = runtime.chat(messages, max_new_tokens=NEW_TOKENS, temperature=0)
    assert runtime.last_stats.stop_reason == "max_new_tokens"
    ref = _eager_tokens(model, hf_ids, **hf_media)
    assert len(ref) == NEW_TOKENS and EOS not in ref, ref
    assert text == runtime.decode(ref)


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


def test_chat_expansion_matches_the_processor(built, processor):
    """expand_placeholders + the tokenizer give the ids Gemma3nProcessor gives for the same text
    (soft tokens of both kinds, twice each, interleaved with text)."""
    from PIL import Image
    from tokenizers import Tokenizer

    from gemma_runtime.multimodal import expand_placeholders
    from multimodal_checkpoint import SPECIAL

    names = {"image": SPECIAL[IMAGE], "audio": SPECIAL[AUDIO], "boi": SPECIAL[BOI], "eoi": SPECIAL[EOI],
             "boa": SPECIAL[BOA], "eoa": SPECIAL[EOA]}
    text = ("<bos><start_of_turn>user\n<image_soft_token><audio_soft_token>w40 w41<image_soft_token>w42"
            "<audio_soft_token><end_of_turn>\n<start_of_turn>model\n")
    got = expand_placeholders(text, names, {"image": 256, "audio": 188})
    tokenizer = Tokenizer.from_file(str(built[1] / "tokenizer.json"))  # the export's, which the runtime reads
    ours = tokenizer.encode(got, add_special_tokens=False).ids
    image = Image.fromarray(np.full((16, 24, 3), 90, np.uint8))
    clip = (0.2 * np.sin(np.arange(8_000) / 5.0)).astype(np.float32)
    want = processor(text=[text], images=[image, image], audio=[clip, clip], add_special_tokens=False,
                     audio_kwargs={"sampling_rate": 16_000}, return_tensors="np")["input_ids"][0].tolist()
    assert ours == want
    assert ours.count(IMAGE) == 512 and ours.count(AUDIO) == 376


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


def test_gemma_run_with_images_and_audio(built, runtime, several, capsys):
    """`gemma-run OUT --image A --image B --audio a --audio b "w40 w41"` (greedy, 16 tokens) exits 0
    and prints what Model.chat gives for that turn: the CLI sends one user turn, images then clips
    then the text, through Model.chat, whose ids and tokens `several` compared with the processor
    and the eager model (Model.chat = the decoded greedy tokens of its chat_ids, as
    test_chat_parts_expand_like_the_processor checks; running it again would cost two more
    vision forwards)."""
    from gemma_runtime.cli import main

    messages, _, _, ours, _ = several
    images = [part["image"] for part in messages[0]["content"] if part["type"] == "image"]
    clips = [part["audio"] for part in messages[0]["content"] if part["type"] == "audio"]
    media = [arg for p in images for arg in ("--image", str(p))] + [arg for p in clips for arg in ("--audio", str(p))]
    argv = [str(built[1]), *media, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0", "w40 w41"]
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out == runtime.decode([t for t in ours if t != EOS]) + "\n"


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
