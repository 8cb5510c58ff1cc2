"""RMS norms as one ONNX RMSNormalization op (opset 23) in the NPU encoder graphs.

The exported chain x * (mean(x^2) + eps)^-0.5 is quantized tensor by tensor in a QDQ graph: x^2 and
its mean span x's range squared, and the emulated HTP's 16-bit rsqrt/Pow(-0.5) drifts from the CPU.
Measured on the tiny audio tower, one uint16 QDQ graph, HTP vs CPU provider on a real clip, lowest
row cosine / max |diff| (outputs up to 3.1): with the chain 0.9995 / 0.13, and 0.992 / 0.44 with the
ranges widened 2x as npu_encoders does; as RMSNormalization, which the QNN provider maps onto the
HTP's own RmsNorm op, 0.99997 / 0.020, widened 2x 0.99986 / 0.041. torch exports F.rms_norm as
RMSNormalization from opset 23.

    with_fused_rms_norms(module, w)   the same module tree with every RMS norm replaced, in place,
                                      by one that calls F.rms_norm on the same weight (returned);
                                      w: the width of the norms without a scale

Replaced: model/layers.py's RMSNorm (the audio tower and both embedders), model/vision.py's
SoftEmbedRMSNorm, timm's RmsNorm2d / RmsNormAct2d (MobileNetV5: over the channels of NCHW, so
permuted to channels-last around the op, the layout the HTP keeps convolutions in).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layers import RMSNorm
from .vision import SoftEmbedRMSNorm

NORM_OPSET = 23  # RMSNormalization


class FusedRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2, -1) + eps) [* weight], as F.rms_norm (the same weight parameter). A norm
    without a scale gets a constant of ones: exported without one, the op's scale input is a
    ConstantOfShape that the quantizer treats as an activation and the HTP leaves to the CPU."""

    def __init__(self, norm: RMSNorm | SoftEmbedRMSNorm, dim: int | None = None):
        super().__init__()
        self.eps = norm.eps
        if norm.weight is not None:
            self.weight = norm.weight
        else:
            if dim is None:
                raise ValueError("an RMS norm without a scale needs its width")
            self.register_buffer("weight", torch.ones(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FusedRmsNorm2d(nn.Module):
    """timm's RmsNorm2d / RmsNormAct2d over the channels of NCHW: permute, F.rms_norm, permute back,
    then the module's drop and activation (RmsNormAct2d)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.eps).permute(0, 3, 1, 2)
        return self.act(self.drop(y))


def _replacement(module: nn.Module, unscaled_width: int | None) -> nn.Module | None:
    if isinstance(module, (RMSNorm, SoftEmbedRMSNorm)):
        return FusedRMSNorm(module, unscaled_width)
    try:
        from timm.layers import RmsNorm2d
    except ImportError:  # pragma: no cover - the vision tower needs timm anyway
        return None
    if isinstance(module, RmsNorm2d):  # RmsNormAct2d is a subclass
        if len(module.normalized_shape) != 1:
            raise ValueError(f"RmsNorm2d over {module.normalized_shape}: one channel axis expected")
        return FusedRmsNorm2d(module)
    return None


def with_fused_rms_norms(module: nn.Module, unscaled_width: int | None = None) -> nn.Module:
    """`module` with every RMS norm below it replaced by its F.rms_norm form; returns `module`.
    unscaled_width: the width of the norms without a scale (the encoders' post-projection norms:
    the text hidden size)."""
    for name, child in list(module.named_children()):
        new = _replacement(child, unscaled_width)
        if new is not None:
            setattr(module, name, new)
        else:
            with_fused_rms_norms(child, unscaled_width)
    return module
