"""Bad images, audio and placeholder counts on a Gemma 3n export with both encoders: each is an
error class of gemma_runtime.errors with a message naming the problem, raised before any encoder
runs, leaving the model usable; gemma-run prints it as one line (no traceback) and exits 2.

The export is the session's tiny multimodal one (conftest.py `multimodal`); no encoder runs here.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from checkpoints import BOS
from multimodal_checkpoint import AUDIO, BOA, BOI, EOA, EOI, IMAGE, NL

RATE = 16_000


def _prompt(images: int, clips: int) -> list[int]:
    ids = [BOS, 30, 31]
    ids += [NL, BOI, *[IMAGE] * 256, EOI, NL] * images
    ids += [NL, BOA, *[AUDIO] * 188, EOA, NL] * clips
    return ids + [40, 41]


@pytest.fixture(scope="module")
def out(multimodal):
    return multimodal[1]


@pytest.fixture(scope="module")
def model(out):
    from gemma_runtime import Model

    return Model.load(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad media files, and a good image whose bytes the truncated one is cut from."""
    import soundfile
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-media")
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "empty.wav").write_bytes(b"")
    soundfile.write(root / "no_samples.wav", np.zeros(0, np.float32), RATE)
    soundfile.write(root / "silent.wav", np.zeros(RATE, np.float32), RATE)
    t = np.arange(31 * RATE) / RATE
    soundfile.write(root / "long.wav", (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), RATE)
    return root


# (kind, file name or array, error class name, message pattern)
CASES = [
    ("image", "truncated.png", "ImageError", r"cannot read image .*truncated\.png"),
    ("image", "not_an_image.jpg", "ImageError", r"cannot read image .*not_an_image\.jpg"),
    ("image", "missing.png", "ImageError", r"image file not found"),
    ("audio", "empty.wav", "AudioError", r"cannot read audio file .*empty\.wav"),
    ("audio", "no_samples.wav", "AudioError", r"empty \(zero samples\)"),
    ("audio", "silent.wav", "AudioError", r"silent"),
    ("audio", "long.wav", "AudioError", r"lasts 31\.00 s; the limit is 30 s"),
]


@pytest.mark.parametrize("kind, name, error, pattern", CASES, ids=[c[1] for c in CASES])
def test_bad_media_file(model, files, kind, name, error, pattern):
    import gemma_runtime

    media = {"images": [files / name]} if kind == "image" else {"audio": [files / name]}
    with pytest.raises(getattr(gemma_runtime, error), match=pattern):
        model.generate_ids(_prompt(kind == "image", kind == "audio"), max_new_tokens=1, **media)
    assert model.loaded_encoders == ()  # refused before any encoder session was opened
    assert model.generate_ids([BOS, 30, 31], max_new_tokens=2)  # and the model still works


@pytest.mark.parametrize("clip, pattern", [
    ((np.zeros(0, np.float32), RATE), r"empty \(zero samples\)"),
    ((np.zeros(RATE, np.float32), RATE), r"silent"),
    ((np.full(30 * RATE + 1, 0.1, np.float32), RATE), r"limit is 30 s"),
    ((np.full(RATE, 0.1, np.float32), 12_345), r"sample rate 12345 Hz is not supported"),
], ids=["zero-length", "silent", "over-30s", "odd-rate"])
def test_bad_audio_array(model, clip, pattern):
    from gemma_runtime import AudioError

    with pytest.raises(AudioError, match=pattern):
        model.generate_ids(_prompt(0, 1), max_new_tokens=1, audio=[clip])


@pytest.mark.parametrize("images, clips, given_images, given_clips, pattern", [
    (1, 0, 0, 0, r"1 image placeholder run\(s\) .* but 0 image"),
    (1, 0, 2, 0, r"1 image placeholder run\(s\) .* but 2 image"),
    (0, 2, 0, 1, r"2 audio placeholder run\(s\) .* but 1 audio"),
    (0, 0, 0, 1, r"0 audio placeholder run\(s\) .* but 1 audio"),
], ids=["image-missing", "image-extra", "clip-missing", "clip-without-run"])
def test_placeholder_count_mismatch(model, files, images, clips, given_images, given_clips, pattern):
    from gemma_runtime import MediaError

    # the media given are unreadable: the count is checked before any of them is opened
    with pytest.raises(MediaError, match=pattern):
        model.generate_ids(_prompt(images, clips), max_new_tokens=1, images=[files / "truncated.png"] * given_images,
                           audio=[files / "silent.wav"] * given_clips)


def _run_cli(capsys, argv) -> tuple[int, str]:
    from gemma_runtime.cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind, name, error, pattern", CASES, ids=[c[1] for c in CASES])
def test_gemma_run_prints_one_line(out, files, capsys, kind, name, error, pattern):
    import re

    rc, err = _run_cli(capsys, [str(out), f"--{kind}", str(files / name), "--max-new-tokens", "1", "w40"])
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma-run: error: "), err
    assert re.search(pattern, lines[0]) and "Traceback" not in err


def test_gemma_run_placeholder_without_image(out, capsys):
    """A raw prompt holding the image soft token but no --image."""
    rc, err = _run_cli(capsys, [str(out), "--max-new-tokens", "1", "w40 <image_soft_token> w41"])
    assert rc == 2
    assert err.strip().count("\n") == 0 and "1 image placeholder run(s)" in err and "but 0 image" in err
