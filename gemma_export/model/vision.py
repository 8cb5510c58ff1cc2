"""The vision encoder graph's model: MobileNetV5 tower + the multimodal embedder's soft path.

    pixel_values [1,3,768,768]
        -> tower.forward_features     timm MobileNetV5Encoder (stem, 4 stages of ER/UIR/MQA blocks,
                                      multi-scale fusion adapter)          -> [1, 2048, 16, 16]
        -> reshape [1, 2048, 256], permute -> [1, 256, 2048], * sqrt(2048)  (get_image_features)
        -> soft_norm (RMS, scale)    -> projection (2048 -> H, no bias)
        -> post_norm (RMS, no scale)                                       -> [1, 256, H]

The tower is timm's own module (the architecture transformers runs through TimmWrapperModel):
its blocks export through torch.onnx (dynamo) with static shapes as they are, so nothing is
rewritten or patched. The embedder mirrors transformers' Gemma3nMultimodalEmbedder soft path,
including its `x * pow(mean(x^2) + eps, -0.5)` form of the RMS norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ExportError


class VisionConfigError(ExportError):
    """The checkpoint's vision config names something this exporter does not build."""


SUPPORTED_TOWERS = ("mobilenetv5_300m_enc",)


@dataclass(frozen=True)
class VisionSpec:
    """What the vision graph needs from a Gemma3nForConditionalGeneration config."""

    text_hidden_size: int
    architecture: str = "mobilenetv5_300m_enc"
    hidden_size: int = 2048  # tower output channels = embedder input
    soft_tokens: int = 256  # vision_soft_tokens_per_image
    image_size: int = 768
    rms_norm_eps: float = 1e-6
    model_args: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs

    @property
    def grid(self) -> int:
        return math.isqrt(self.soft_tokens)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.image_size, self.image_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, self.soft_tokens, self.text_hidden_size)


def vision_spec_from_config(config: dict[str, Any], image_size: int = 768) -> VisionSpec:
    """The spec from the checkpoint's config.json (Hugging Face layout). `image_size` comes
    from preprocessor_config.json (its `size`), which the config does not record."""
    if "vision_config" not in config or "text_config" not in config:
        raise VisionConfigError("config.json has no vision_config/text_config: not a multimodal Gemma 3n checkpoint")
    vision, text = config["vision_config"], config["text_config"]
    architecture = vision.get("architecture", "mobilenetv5_300m_enc")
    if architecture not in SUPPORTED_TOWERS:
        raise VisionConfigError(f"vision tower {architecture!r} is not supported; supported: {', '.join(SUPPORTED_TOWERS)}")
    soft_tokens = int(config.get("vision_soft_tokens_per_image", 256))
    if math.isqrt(soft_tokens) ** 2 != soft_tokens:
        raise VisionConfigError(f"vision_soft_tokens_per_image={soft_tokens} is not a square grid")
    return VisionSpec(
        text_hidden_size=int(text["hidden_size"]),
        architecture=architecture,
        hidden_size=int(vision.get("hidden_size", 2048)),
        soft_tokens=soft_tokens,
        image_size=image_size,
        rms_norm_eps=float(vision.get("rms_norm_eps", 1e-6)),
        model_args=dict(vision.get("model_args") or {}),
    )


def create_tower(spec: VisionSpec) -> nn.Module:
    """timm's tower, as transformers' TimmWrapperModel creates it (num_classes=0, model_args)."""
    try:
        import timm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise VisionConfigError("the vision graph needs timm (pip install 'timm>=1.0')") from err
    return timm.create_model(spec.architecture, pretrained=False, num_classes=0, **spec.model_args)


class SoftEmbedRMSNorm(nn.Module):
    """Gemma3nRMSNorm: x * pow(mean(x^2) + eps, -0.5) [* weight], computed in float32."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return x * self.weight if self.weight is not None else x


class VisionEncoder(nn.Module):
    """pixel_values [1,3,S,S] float32 in [0,1] -> soft embeddings [1, soft_tokens, H]."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.tower = create_tower(spec)
        self.soft_norm = SoftEmbedRMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.projection = nn.Linear(spec.hidden_size, spec.text_hidden_size, bias=False)
        self.post_norm = SoftEmbedRMSNorm(spec.text_hidden_size, spec.rms_norm_eps, with_scale=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        features = self.tower.forward_features(pixel_values)  # [1, C, g, g]
        tokens = features.reshape(1, spec.hidden_size, spec.soft_tokens).permute(0, 2, 1)
        tokens = tokens * spec.hidden_size**0.5
        return self.post_norm(self.projection(self.soft_norm(tokens)))
