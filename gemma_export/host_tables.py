"""Host tables: token id -> row of inputs_embeds (embed_tokens.bin) and, for Gemma 3n, token id ->
per-layer embeddings (per_layer.bin). Kept out of the graphs (the runtime memory-maps them), rows
already multiplied by their embedding scale, written in blocks so memory stays bounded.

Row formats (TABLE_FORMATS in recipes.py), each a HostTable layout of the manifest:
- float32: the rows as they are.
- int8 per row (the default of the int8/int4 recipes): q[r] = round(x[r] / s[r]) in [-127, 127]
  with s[r] = max|x[r]| / 127, one byte a value.
- int4 per row: q[r] = round(x[r] / s[r]) in [-8, 7], two values a byte (two's complement
  nibbles, column 2j in the low nibble of byte j, 2j+1 in the high one, as MatMulNBits packs; a
  row of odd width ends in a byte whose high nibble is 0), ceil(cols / 2) bytes a row. All 16 codes,
  no zero point: the scale takes the sign that puts the row's largest magnitude x_p on the -8 side,
  s[r] = -x_p * c / 8 (llama.cpp's Q4_0 at c = 1), so the step is |x_p| / 8 rather than the |x_p| / 7
  of [-7, 7]; c in 1.0, 0.95, ..., 0.5 is searched per row for the least squared error (clipping the
  few largest values where that pays). On Gemma 3 270M's token table (fp32 graphs, 4096 tokens of
  CPython's docs vs the fp32 export): [-7, 7] at s = max / 7 81.7% top-1, KL 0.156, ppl ratio 1.154;
  [-8, 7] at c = 1 84.2%, 0.112, 1.103; with the search 86.1%, 0.096, 1.106 (the search: 4.6 s a
  270M table on 2 shared cores, int8 1.4 s).
The quantized rows come first, then (at a 64-byte aligned offset) one float32 scale a row
(scale_layout "per_row"); the runtime dequantizes q[r] * s[r] for the looked-up rows only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gemma_runtime.manifest import HostTable
from gemma_runtime.tables import row_bytes

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


def _row_scales(x: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(q float32 in [-top, top], scales float32 [rows]): symmetric per row, s = max|x[r]| / top."""
    x = np.asarray(x, dtype=np.float32)
    scales = (np.abs(x).max(axis=1) / top).astype(np.float32)
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    return np.clip(np.rint(x / safe[:, None]), -top, top), scales


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [rows, cols], scales float32 [rows]): x[r] ~ q[r] * scales[r]."""
    q, scales = _row_scales(x, 127)
    return q.astype(np.int8), scales


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 [rows, cols] in [-8, 7] -> uint8 [rows, ceil(cols / 2)]: column 2j in the low nibble of
    byte j, 2j+1 in its high nibble, two's complement; an odd last column leaves a zero high nibble."""
    nibbles = np.asarray(q, dtype=np.int8).view(np.uint8) & 0x0F
    if nibbles.shape[1] % 2:
        nibbles = np.pad(nibbles, ((0, 0), (0, 1)))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


INT4_CLIPS = tuple(1 - 0.05 * i for i in range(11))  # c of s = -x_p * c / 8, tried in this order
_INT4_STEP = 1 << 22  # values quantized at a time by the search (its temporaries stay ~100 MB)


def int4_row_scales(x: np.ndarray) -> np.ndarray:
    """float32 [rows]: per row, of s = -x_p * c / 8 over c in INT4_CLIPS (x_p the row's value of
    largest magnitude), the first with the least sum of (clip(round(x / s), -8, 7) * s - x)^2."""
    peak = x[np.arange(x.shape[0]), np.abs(x).argmax(axis=1)]
    best, best_err = None, None
    for c in INT4_CLIPS:
        scale = (peak * np.float32(-c / 8)).astype(np.float32)
        err = np.square(_codes(x, scale, 8) * scale[:, None] - x).sum(axis=1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
    return best


def _codes(x: np.ndarray, scale: np.ndarray, top: int) -> np.ndarray:
    """clip(round(x / s), -top, top - 1) per row (a zero scale gives zeros), float32."""
    safe = np.where(scale != 0, scale, 1).astype(np.float32)
    return np.clip(np.rint(x / safe[:, None]), -top, top - 1)


def quantize_rows_int4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 [rows, ceil(cols / 2)], scales float32 [rows]): x[r] ~ q[r] * scales[r] with
    q[r] in [-8, 7] (scales from int4_row_scales), packed by pack_int4."""
    x = np.asarray(x, dtype=np.float32)
    step = max(1, _INT4_STEP // max(1, x.shape[1]))
    scales = np.concatenate([int4_row_scales(x[i : i + step]) for i in range(0, x.shape[0], step)])
    return pack_int4(_codes(x, scales, 8).astype(np.int8)), scales


# per-row formats: name -> the quantizer of a float32 block of rows
_PER_ROW = {"int8": quantize_rows_int8, "int4": quantize_rows_int4}
_SCALE_ALIGN = 64


def _write_per_row(path: Path, blocks, row_format: str) -> HostTable:
    """blocks: float32 arrays [rows_i, cols], quantized by `row_format`; the scales are kept (4 bytes
    a row) and written last."""
    quantize = _PER_ROW[row_format]
    count, cols, scales = 0, 0, []
    with path.open("wb") as f:
        for block in blocks:
            q, s = quantize(block)
            f.write(q.tobytes())
            scales.append(s)
            count, cols = count + block.shape[0], block.shape[1]
        spec = _per_row_spec(path.name, count, cols, row_format)
        f.write(b"\0" * (spec.scale_offset - f.tell()))
        f.write(np.concatenate(scales).astype(np.float32).tobytes())
    return spec


def _per_row_spec(file: str, rows: int, cols: int, row_format: str) -> HostTable:
    width = row_bytes(row_format, cols)
    offset = rows * width + (-(rows * width) % _SCALE_ALIGN)
    return HostTable(file=file, dtype=row_format, shape=(rows, cols), data_offset=0, scale_layout="per_row",
                     scale_dtype="float32", scale_offset=offset, row_bytes=width)


def quantize_table_file(folder: Path, table: HostTable, source: Path | None = None, rows_per_step: int = 16384,
                        row_format: str = "int8") -> HostTable:
    """A float32 table file (in `source`, default `folder`) written per row in `row_format` ("int8"
    or "int4") into `folder` under the same file name."""
    if table.dtype != "float32" or table.scale_layout is not None:
        raise ValueError(f"{table.file} is {table.dtype}, not a float32 table")
    if row_format not in _PER_ROW:
        raise ValueError(f"unknown per-row table format {row_format!r} (known: {', '.join(_PER_ROW)})")
    src = Path(source or folder) / table.file
    rows, cols = table.shape
    dst = Path(folder) / table.file
    tmp = dst.with_name(dst.name + ".partial")

    def blocks():  # plain reads, a block at a time (a memory map would keep its pages resident)
        for i in range(0, rows, rows_per_step):
            n = min(rows_per_step, rows - i)
            offset = table.data_offset + i * cols * 4
            yield np.fromfile(src, dtype=np.float32, count=n * cols, offset=offset).reshape(n, cols)

    _write_per_row(tmp, blocks(), row_format)
    tmp.replace(dst)
    return _per_row_spec(table.file, rows, cols, row_format)


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
    """Writes the tables in `row_format` ("float32", "int8" or "int4"); returns their manifest entries.
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
        if row_format in _PER_ROW:
            tables[table] = _write_per_row(folder / file, (b.detach().to("cpu").float().numpy() for b in blocks), row_format)
        elif row_format == "float32":
            rows, cols = _write_float32(folder / file, blocks)
            tables[table] = HostTable(file=file, dtype="float32", shape=(rows, cols), row_bytes=row_bytes("float32", cols))
        else:
            raise ValueError(f"unknown host table format {row_format!r}")
    return tables
