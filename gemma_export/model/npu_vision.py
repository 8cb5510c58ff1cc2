"""The vision encoder as NPU targets need it: model/vision.py's VisionEncoder (timm's MobileNetV5 +
the embedder's soft path), the same weights, two changes for the opset-23 export of npu_encoders.py:

- RMS norms as RMSNormalization ops (model/npu_norms.py; MobileNetV5's channel norms permuted to
  channels-last around the op);
- attention as explicit MatMul/Softmax: timm's MultiQueryAttention2d calls
  F.scaled_dot_product_attention, which the opset-23 exporter writes as ONNX's Attention op (not an
  HTP op, and its converter fails on multi-query heads); timm's own unfused path
  (`fused_attn = False`) computes softmax(q * scale @ k^T) @ v, as the opset-18 CPU graph does.
"""

from __future__ import annotations

from .npu_norms import with_fused_rms_norms
from .vision import VisionEncoder


def npu_vision(encoder: VisionEncoder) -> VisionEncoder:
    """`encoder`, changed in place as above, returned."""
    for module in encoder.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return with_fused_rms_norms(encoder, encoder.spec.text_hidden_size)
