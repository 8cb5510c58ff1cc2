"""The checkpoint's image processor, re-implemented with numpy + pillow (no torch, no transformers).

It follows transformers' SigLIP image processor, PIL backend (`SiglipImageProcessorPil`), step by
step, as the export folder's preprocessor_config.json configures it:

    open (any format pillow reads; EXIF orientation applied, as transformers' load_image does)
    -> convert to RGB        (do_convert_rgb: alpha composited onto white, as convert_to_rgb does)
    -> resize                (do_resize: size {height,width}, resample as a PIL filter id)
    -> rescale               (do_rescale: float64 * rescale_factor, then float32)
    -> normalize             (do_normalize: (x - mean) / std in float32)
    -> [1, 3, H, W] float32

The released Gemma 3n configures RGB, 768x768 bilinear, rescale 1/255 and no normalization
(do_normalize is false although image_mean/std are listed). Pillow is imported when first needed,
so text-only use of the runtime never loads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .errors import ImageError


ImageInput = Union[str, os.PathLike, "PIL.Image.Image"]  # noqa: F821 - PIL is imported lazily

# Class defaults of SiglipImageProcessor, used where the config leaves a field out or null.
_DEFAULTS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
_SUPPORTED_TYPES = {"SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil"}


def _pil():
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImageError("image input needs pillow: pip install pillow") from err
    return PIL


@dataclass(frozen=True)
class ImageProcessorConfig:
    do_convert_rgb: bool
    do_resize: bool
    height: int
    width: int
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ImageProcessorConfig":
        kind = config.get("image_processor_type")
        if kind is not None and kind not in _SUPPORTED_TYPES:
            raise ImageError(f"image processor {kind!r} is not supported; supported: {', '.join(sorted(_SUPPORTED_TYPES))}")
        unsupported = [k for k in ("do_center_crop", "do_pad") if config.get(k)]
        if unsupported:
            raise ImageError(f"preprocessor_config.json sets {', '.join(unsupported)}, which this runtime does not implement")

        def get(key):
            value = config.get(key)
            return _DEFAULTS[key] if value is None else value

        size = get("size")
        if "height" not in size or "width" not in size:
            raise ImageError(f"preprocessor_config.json: size must give height and width, got {size!r}")
        mean, std = get("image_mean"), get("image_std")
        mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
        std = [std] * 3 if isinstance(std, (int, float)) else list(std)
        return cls(
            do_convert_rgb=bool(get("do_convert_rgb")),
            do_resize=bool(get("do_resize")),
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(get("resample")),
            do_rescale=bool(get("do_rescale")),
            rescale_factor=float(get("rescale_factor")),
            do_normalize=bool(get("do_normalize")),
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ImageError(f"cannot read the image processor config {path}: {err}") from err
        return cls.from_dict(config)


def load_image(source: ImageInput):
    """A fully decoded PIL image from a path or a PIL image; EXIF orientation applied to files."""
    PIL = _pil()
    if isinstance(source, PIL.Image.Image):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(f"an image must be a file path or a PIL.Image, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now: truncated or corrupt data fails here, not later
            upright = PIL.ImageOps.exif_transpose(image)
            upright.load()
            return upright
    except PIL.Image.DecompressionBombError as err:
        raise ImageError(f"image {path} is too large to decode safely: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise ImageError(f"cannot read image {path}: {err} (is it a complete image file in a format pillow reads?)") from err


def _to_rgb(image) -> np.ndarray:
    """transformers' convert_to_rgb: transparency is composited onto white."""
    PIL = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.array(image)


def preprocess(source: ImageInput, config: ImageProcessorConfig) -> np.ndarray:
    """One image -> pixel_values [1, C, H, W] float32, exactly as the PIL backend computes them."""
    PIL = _pil()
    image = load_image(source)
    try:
        pixels = _to_rgb(image) if config.do_convert_rgb else np.array(image)
    except (OSError, ValueError) as err:
        raise ImageError(f"cannot convert the image to RGB: {err}") from err
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.dtype != np.uint8:
        raise ImageError(f"unsupported pixel type {pixels.dtype} (mode {image.mode}); convert the image to 8-bit first")
    if config.do_resize:
        squeezed = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
        resized = PIL.Image.fromarray(squeezed).resize((config.width, config.height), resample=config.resample)
        pixels = np.array(resized)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
    out = pixels.transpose(2, 0, 1)  # [C, H, W]
    if config.do_rescale:
        out = (out.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        out = out.astype(np.float32) if not np.issubdtype(out.dtype, np.floating) else out
        if out.shape[0] != len(config.image_mean):
            raise ImageError(f"image has {out.shape[0]} channels, the normalization {len(config.image_mean)}")
        mean = np.array(config.image_mean, dtype=out.dtype)
        std = np.array(config.image_std, dtype=out.dtype)
        out = ((out.T - mean) / std).T
    return np.ascontiguousarray(out, dtype=np.float32)[None]


class ImageProcessor:
    """The export folder's image processor: `ImageProcessor.from_folder(out)(path) -> [1,3,H,W]`."""

    def __init__(self, config: ImageProcessorConfig):
        self.config = config

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageProcessor":
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise ImageError(f"{folder} has no preprocessor_config.json, so it cannot take images")
        return cls(ImageProcessorConfig.from_file(path))

    def __call__(self, source: ImageInput) -> np.ndarray:
        return preprocess(source, self.config)
