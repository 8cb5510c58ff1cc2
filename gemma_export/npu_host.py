"""Host-side inputs of the NPU decoder graphs (model/npu_text.py): rope tables, additive masks and
the one-hot of the last valid row, computed with the CPU graph's own functions (model/layers.py),
so the two graphs see the same positions and masks by construction."""

from __future__ import annotations

import numpy as np
import torch

from .model.layers import attention_masks, rope_tables
from .model.npu_text import KINDS, MASK_VALUE, layer_kinds
from .variants import Variant


def _mask_length(variant: Variant, layer_type: str, max_context: int) -> int:
    layer = next(i for i in variant.cache_layers if variant.layer_types[i] == layer_type)
    return variant.cache_length(layer, max_context)


def host_inputs(variant: Variant, max_context: int, position: int, valid: int, chunk: int) -> dict[str, np.ndarray]:
    """Everything but embeddings and caches, for a chunk of `chunk` rows of which `valid` are real,
    starting at absolute `position`."""
    if not 1 <= valid <= chunk:
        raise ValueError(f"valid must be in 1..{chunk}, got {valid}")
    pos = torch.tensor([position], dtype=torch.int64)
    positions = (pos + torch.arange(chunk, dtype=torch.int64)).to(torch.float32)
    out: dict[str, np.ndarray] = {}
    for t in layer_kinds(variant):
        cos, sin = rope_tables(variant, t, positions)
        out[f"cos.{KINDS[t]}"], out[f"sin.{KINDS[t]}"] = cos.numpy(), sin.numpy()
    for t in layer_kinds(variant):
        past, new = attention_masks(variant, t, _mask_length(variant, t, max_context), pos, chunk)
        out[f"mask_past.{KINDS[t]}"] = np.where(past.numpy(), 0.0, MASK_VALUE).astype(np.float32)
        out[f"mask_new.{KINDS[t]}"] = np.where(new.numpy(), 0.0, MASK_VALUE).astype(np.float32)
    last = np.zeros((1, 1, chunk), dtype=np.float32)
    last[0, 0, valid - 1] = 1.0
    out["last"] = last
    return out
