"""The runtime's image processor equals transformers' SigLIP image processor (PIL backend).

transformers 5 picks a processor's backend with `AutoImageProcessor.from_pretrained(...,
backend="pil" | "torchvision")`; the PIL one is `SiglipImageProcessorPil`, built here from the same
config dict, which pillow can match bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gemma_runtime.errors import GemmaRuntimeError
from gemma_runtime.image_processing import ImageError, ImageProcessor, ImageProcessorConfig, preprocess

# The released Gemma 3n preprocessor_config.json, image fields (audio fields left out).
GEMMA3N_CONFIG = {
    "image_processor_type": "SiglipImageProcessorFast",
    "do_convert_rgb": None,
    "do_resize": True,
    "size": {"height": 768, "width": 768},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": False,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_center_crop": None,
}
NORMALIZED_CONFIG = {**GEMMA3N_CONFIG, "do_normalize": True, "size": {"height": 224, "width": 160},
                     "resample": 3, "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
CONFIGS = {"gemma3n": GEMMA3N_CONFIG, "normalized": NORMALIZED_CONFIG}


def _reference(config: dict, image: Image.Image) -> np.ndarray:
    from transformers import SiglipImageProcessorPil

    kwargs = {k: v for k, v in config.items() if v is not None and k != "image_processor_type"}
    return SiglipImageProcessorPil(**kwargs)(images=image, return_tensors="np")["pixel_values"]


def _noise(rng, shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _images(folder):
    """(name, path) of generated images in several formats, modes and odd sizes."""
    rng = np.random.default_rng(0)
    out = {}
    rgba = _noise(rng, (97, 131, 4))
    rgba[:20, :, 3] = 0  # fully transparent band: composited onto white
    out["rgba.png"] = Image.fromarray(rgba, "RGBA")
    out["rgb.jpg"] = Image.fromarray(_noise(rng, (480, 641, 3)), "RGB")
    out["gray.png"] = Image.fromarray(_noise(rng, (33, 1001)), "L")
    out["palette.gif"] = Image.fromarray(_noise(rng, (50, 70, 3)), "RGB").convert("P")
    out["big.webp"] = Image.fromarray(_noise(rng, (1023, 900, 3)), "RGB")
    out["tiny.bmp"] = Image.fromarray(_noise(rng, (1, 3, 3)), "RGB")
    paths = {}
    for name, image in out.items():
        path = folder / name
        image.save(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    return _images(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("image_name", ["rgba.png", "rgb.jpg", "gray.png", "palette.gif", "big.webp", "tiny.bmp"])
def test_equals_transformers_pil_backend(image_files, config_name, image_name):
    config = CONFIGS[config_name]
    path = image_files[image_name]
    ours = preprocess(path, ImageProcessorConfig.from_dict(config))
    with Image.open(path) as image:
        image.load()
        ref = _reference(config, image)
    size = config["size"]
    assert ours.shape == (1, 3, size["height"], size["width"]) == ref.shape
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_pil_image_input_equals_path_input(image_files):
    config = ImageProcessorConfig.from_dict(GEMMA3N_CONFIG)
    with Image.open(image_files["rgba.png"]) as image:
        image.load()
        from_pil = preprocess(image, config)
    np.testing.assert_array_equal(from_pil, preprocess(image_files["rgba.png"], config))
    assert 0.0 <= from_pil.min() and from_pil.max() <= 1.0


def test_from_folder(tmp_path, image_files):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GEMMA3N_CONFIG))
    processor = ImageProcessor.from_folder(tmp_path)
    assert processor.config.do_normalize is False and processor.config.resample == 2
    assert processor(image_files["rgb.jpg"]).shape == (1, 3, 768, 768)


def test_truncated_file_is_a_clear_error(tmp_path, image_files):
    data = image_files["rgb.jpg"].read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.jpg"):
        preprocess(truncated, ImageProcessorConfig.from_dict(GEMMA3N_CONFIG))
    png = image_files["rgba.png"].read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 3])
    with pytest.raises(ImageError, match="truncated.png"):
        preprocess(tmp_path / "truncated.png", ImageProcessorConfig.from_dict(GEMMA3N_CONFIG))


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_unreadable_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="bad.png") as info:
        preprocess(path, ImageProcessorConfig.from_dict(GEMMA3N_CONFIG))
    assert isinstance(info.value, GemmaRuntimeError)


def test_missing_file_and_wrong_type(tmp_path):
    config = ImageProcessorConfig.from_dict(GEMMA3N_CONFIG)
    with pytest.raises(ImageError, match="not found"):
        preprocess(tmp_path / "nope.jpg", config)
    with pytest.raises(ImageError, match="file path or a PIL.Image"):
        preprocess(np.zeros((4, 4, 3), np.uint8), config)


def test_unsupported_config_is_a_clear_error():
    with pytest.raises(ImageError, match="not supported"):
        ImageProcessorConfig.from_dict({**GEMMA3N_CONFIG, "image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ImageError, match="do_center_crop"):
        ImageProcessorConfig.from_dict({**GEMMA3N_CONFIG, "do_center_crop": True})
