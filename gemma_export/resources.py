"""Before an export starts: is there disk space and memory for what it will write and hold?"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil

from .errors import ExportError
from .variants import Variant

_FLOAT = 4  # bytes per float32 weight
GIB = 1 << 30


def decoder_parameters(variant: Variant) -> int:
    """Weights inside the decoder graph (the host tables excluded), from the variant alone."""
    import torch

    from .model.text import TextDecoder

    with torch.device("meta"):
        model = TextDecoder(variant, 1)
    return sum(p.numel() for p in model.parameters())


def table_parameters(variant: Variant) -> int:
    n = variant.vocab_size * variant.hidden_size
    if variant.gemma3n:
        n += variant.gemma3n.per_layer_vocab_size * variant.num_layers * variant.gemma3n.per_layer_dim
    return n


def estimate(variant: Variant) -> tuple[int, int]:
    """(bytes written to disk, peak bytes of memory) of an fp32 export.

    Memory: the float32 model, plus the exporter's copy of its initializers while it builds and
    optimizes the ONNX model (measured: about 2x the model for the dynamo exporter), plus one
    host table block.
    """
    decoder = decoder_parameters(variant) * _FLOAT
    disk = decoder + table_parameters(variant) * _FLOAT
    memory = 3 * decoder + GIB
    return disk, memory


def check_resources(variant: Variant, out_parent: Path) -> None:
    disk_needed, memory_needed = estimate(variant)
    parent = out_parent if out_parent.exists() else Path.cwd()
    free = shutil.disk_usage(parent).free
    if free < disk_needed * 1.05:
        raise ExportError(
            f"not enough disk space in {parent}: the export writes about {disk_needed / GIB:.1f} GiB, "
            f"{free / GIB:.1f} GiB free"
        )
    available = psutil.virtual_memory().available
    if available < memory_needed:
        raise ExportError(
            f"not enough memory: the export needs about {memory_needed / GIB:.1f} GiB, "
            f"{available / GIB:.1f} GiB available (close other programs or use a larger machine)"
        )
