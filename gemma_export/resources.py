"""Before an export starts: is there disk space and memory for what it will write and hold?"""

from __future__ import annotations

import math
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


def largest_weight(variant: Variant) -> int:
    """Elements of the largest single weight the decoder graph holds (the LM head, as a rule)."""
    import torch

    from .model.text import TextDecoder

    with torch.device("meta"):
        model = TextDecoder(variant, 1)
    return max(variant.vocab_size * variant.hidden_size, *(p.numel() for p in model.parameters()))


def _weight_bytes(name: str, shape: tuple[int, ...], recipe) -> float:
    """Bytes of one decoder weight under `recipe`: float32, float16, or n-bit codes plus a float32
    scale and at most a float32 zero point per block (classes as passes/matmuls.py names them)."""
    numel = math.prod(shape)
    if recipe is None or len(shape) != 2:
        return numel * _FLOAT
    parts = name.split(".")
    cls = "lm_head" if name == "lm_head_t" else "attention" if "self_attn" in parts else "mlp" if "mlp" in parts else "other"
    fmt = recipe.format_for(cls, name.rpartition(".")[0] or name)
    if fmt is None:
        return numel * _FLOAT
    return numel * (2 if fmt.bits == 16 else fmt.bits / 8 + 8 / fmt.block_size)


def estimate(variant: Variant, recipe=None) -> tuple[int, int]:
    """(bytes written to disk, peak bytes of memory) of an export under `recipe` (None: fp32).

    Disk: each decoder weight in its recipe's format (+5%), host tables in float32 or int8 rows.
    Memory: the decoder is streamed (stream_export.py): one weight is made, quantized (its codes
    at most half of it again, plus the block search's temporaries) and dropped at a time; host
    tables go by 64 MB row blocks; plus the exporter's trace of the graph and the libraries (about
    0.8 GiB imported). Measured on the real Gemma 3 270M (largest weight: the 640 MiB LM head):
    peak 2.4-3.1 GiB across the recipes, about 3x the largest weight above the libraries, so
    4x the largest weight + 1 GiB (3.5 GiB there; tests/test_export_resources.py checks it
    against a measured peak).
    """
    import torch

    from .model.text import TextDecoder

    with torch.device("meta"):
        model = TextDecoder(variant, 1)
    decoder = sum(_weight_bytes(n, tuple(p.shape), recipe) for n, p in model.named_parameters())
    table_bytes = {"int8": 1, "int4": 0.5}.get(recipe.tables if recipe is not None else "float32", _FLOAT)
    tables = int(table_parameters(variant) * table_bytes)
    memory = 4 * largest_weight(variant) * _FLOAT + GIB
    return int(decoder * 1.05) + tables, memory


def check_resources(variant: Variant, out_parent: Path, recipe=None, encoders: dict | None = None) -> None:
    """Refuses an export that the disk or memory cannot hold. `encoders`: the config.json of a
    multimodal Gemma 3n checkpoint whose vision and audio graphs are written too (after the
    decoder, so their memory peak is apart from the decoder's while their files add up)."""
    disk_needed, memory_needed = estimate(variant, recipe)
    if encoders is not None:
        from .encoders import encoder_estimate

        disk, memory = encoder_estimate(encoders, recipe)
        disk_needed, memory_needed = disk_needed + disk, max(memory_needed, memory)
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
