"""Host tables: token id -> row of inputs_embeds (embed_tokens.bin) and, for Gemma 3n, token id ->
per-layer embeddings (per_layer.bin). Kept out of the graphs (the runtime memory-maps them), rows
already multiplied by their embedding scale, written in blocks so memory stays bounded.

Row formats: float32, or int8 per row (the int8/int4 recipes): row r is stored as
q[r] = round(x[r] / s[r]) in [-127, 127] with s[r] = max|x[r]| / 127, the int8 rows first and the
float32 scales after them (HostTable scale_layout "per_row"); the runtime dequantizes q[r] * s[r].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

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


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [rows, cols], scales float32 [rows]): x[r] ~ q[r] * scales[r]."""
    x = np.asarray(x, dtype=np.float32)
    peak = np.abs(x).max(axis=1)
    scales = (peak / 127).astype(np.float32)
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scales


_SCALE_ALIGN = 64


def _write_int8_per_row(path: Path, blocks) -> HostTable:
    """blocks: float32 arrays [rows_i, cols]; the scales are kept (4 bytes a row) and written last."""
    count, cols, scales = 0, 0, []
    with path.open("wb") as f:
        for block in blocks:
            q, s = quantize_rows_int8(block)
            f.write(q.tobytes())
            scales.append(s)
            count, cols = count + q.shape[0], q.shape[1]
        spec = _int8_spec(path.name, count, cols)
        f.write(b"\0" * (spec.scale_offset - f.tell()))
        f.write(np.concatenate(scales).astype(np.float32).tobytes())
    return spec


def _int8_spec(file: str, rows: int, cols: int) -> HostTable:
    offset = rows * cols + (-(rows * cols) % _SCALE_ALIGN)
    return HostTable(file=file, dtype="int8", shape=(rows, cols), data_offset=0,
                     scale_layout="per_row", scale_dtype="float32", scale_offset=offset)


def quantize_table_file(folder: Path, table: HostTable, source: Path | None = None, rows_per_step: int = 16384) -> HostTable:
    """A float32 table file (in `source`, default `folder`) written as int8 per row into `folder`
    under the same file name."""
    if table.dtype != "float32" or table.scale_layout is not None:
        raise ValueError(f"{table.file} is {table.dtype}, not a float32 table")
    src = Path(source or folder) / table.file
    rows, cols = table.shape
    dst = Path(folder) / table.file
    tmp = dst.with_name(dst.name + ".partial")

    def blocks():  # plain reads, a block at a time (a memory map would keep its pages resident)
        for i in range(0, rows, rows_per_step):
            n = min(rows_per_step, rows - i)
            offset = table.data_offset + i * cols * 4
            yield np.fromfile(src, dtype=np.float32, count=n * cols, offset=offset).reshape(n, cols)

    _write_int8_per_row(tmp, blocks())
    tmp.replace(dst)
    return _int8_spec(table.file, rows, cols)


def _with_rows(blocks, overrides: dict[int, np.ndarray]):
    """The row blocks with rows [start, start + len(rows)) replaced by `rows`, per override."""
    first = 0
    for block in blocks:
        array = block.detach().to("cpu").float().numpy()
        n = array.shape[0]
        for start, rows in overrides.items():
            lo, hi = max(start, first), min(start + rows.shape[0], first + n)
            if lo < hi:
                array = array.copy() if not array.flags.writeable else array
                array[lo - first : hi - first] = rows[lo - start : hi - start]
        first += n
        yield torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def write_host_tables(variant: Variant, tensors: TensorSource, folder: Path, row_format: str = "float32",
                      embed_overrides: dict[int, np.ndarray] | None = None) -> dict[str, HostTable]:
    """Writes the tables in `row_format` ("float32" or "int8"); returns their manifest entries.
    embed_overrides: first row -> float32 rows [n, H] written into embed_tokens.bin instead of the
    scaled text rows (Gemma 3n: the vision/audio vocabularies, embedded by their hard paths)."""
    prefix = TEXT_PREFIX[variant.architecture]
    sources = {EMBED_TOKENS: (prefix + "embed_tokens.weight", math.sqrt(variant.hidden_size))}
    if variant.gemma3n:
        sources[PER_LAYER] = (prefix + "embed_tokens_per_layer.weight", math.sqrt(variant.gemma3n.per_layer_dim))
    tables = {}
    for table, (name, scale) in sources.items():
        file = TABLE_FILES[table]
        blocks = table_rows(tensors, name, scale)
        if table == EMBED_TOKENS and embed_overrides:
            end = max(start + rows.shape[0] for start, rows in embed_overrides.items())
            if end > tensors.shape(name)[0]:
                raise ValueError(f"embed_tokens has {tensors.shape(name)[0]} rows; the hard-token rows end at {end}")
            blocks = _with_rows(blocks, embed_overrides)
        if row_format == "int8":
            tables[table] = _write_int8_per_row(folder / file, (b.detach().to("cpu").float().numpy() for b in blocks))
        elif row_format == "float32":
            rows, cols = _write_float32(folder / file, blocks)
            tables[table] = HostTable(file=file, dtype="float32", shape=(rows, cols))
        else:
            raise ValueError(f"unknown host table format {row_format!r}")
    return tables
