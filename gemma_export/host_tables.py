"""Host tables: token id -> row of inputs_embeds (embed_tokens.bin) and, for Gemma 3n, token id ->
per-layer embeddings (per_layer.bin). Kept out of the graphs (the runtime memory-maps them), rows
already multiplied by their embedding scale, written in blocks so memory stays bounded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gemma_runtime.manifest import HostTable

from .variants import Variant
from .weights import EMBED_TOKENS, PER_LAYER, TEXT_PREFIX, TensorSource, table_rows

TABLE_FILES = {EMBED_TOKENS: "embed_tokens.bin", PER_LAYER: "per_layer.bin"}


def _write_float32(path: Path, rows) -> tuple[int, int]:
    count, cols = 0, 0
    with path.open("wb") as f:
        for block in rows:
            array = block.detach().to("cpu").float().numpy()
            f.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
            count, cols = count + array.shape[0], array.shape[1]
    return count, cols


def write_host_tables(variant: Variant, tensors: TensorSource, folder: Path) -> dict[str, HostTable]:
    """Writes the float32 tables; returns their manifest entries."""
    prefix = TEXT_PREFIX[variant.architecture]
    sources = {EMBED_TOKENS: (prefix + "embed_tokens.weight", math.sqrt(variant.hidden_size))}
    if variant.gemma3n:
        sources[PER_LAYER] = (prefix + "embed_tokens_per_layer.weight", math.sqrt(variant.gemma3n.per_layer_dim))
    tables = {}
    for table, (name, scale) in sources.items():
        file = TABLE_FILES[table]
        rows, cols = _write_float32(folder / file, table_rows(tensors, name, scale))
        tables[table] = HostTable(file=file, dtype="float32", shape=(rows, cols))
    return tables
