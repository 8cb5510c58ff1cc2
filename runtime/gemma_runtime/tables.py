"""Host tables: token id -> one row, read by memory map so a 1 GB table costs no RAM up front.

The map is advised MADV_RANDOM: a looked-up row is a few KiB at a random place, and the kernel's
default readahead around each fault brought in ~0.5-0.8 MiB per token (E2B, 144 random ids: the
per-layer table's resident pages 114 MiB, the token table's 65 MiB; with the advice 2.2 and 0.7).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import HostTable, ManifestError

# Row dtypes this runtime dequantizes; anything else must fail loudly, never be misread.
_FLOAT_DTYPES = {"float32", "float16"}
_INT_DTYPES = {"int8", "int4"}
_SCALE_DTYPES = {"float32", "float16"}

# int4 rows: byte b -> (its low nibble, its high nibble) as signed 4-bit values, in float32. A
# row decodes with one np.take over its bytes straight into the output row (columns 2j, 2j+1).
_BYTES = np.arange(256, dtype=np.uint8)
_INT4_NIBBLES = np.stack([((_BYTES & 0x0F) ^ 8).astype(np.int8) - 8, _BYTES.view(np.int8) >> 4], axis=1).astype(np.float32)


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes one stored row of `cols` values takes: int4 packs two values a byte."""
    return (cols + 1) // 2 if dtype == "int4" else cols * np.dtype(dtype).itemsize


def _map_for_random_reads(path: Path) -> mmap.mmap:
    """The whole file mapped read-only, without readahead where the platform takes the advice
    (the arrays over it keep it open)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):  # not on Windows
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def _dequantize_int4_row(packed: np.ndarray, scale: np.float32, row: np.ndarray) -> None:
    """row (float32 [cols], C-contiguous) = the signed nibbles of `packed` (uint8 [ceil(cols/2)])
    times `scale`, in place; an odd row's last byte holds its last column in the low nibble."""
    pairs = row.shape[0] // 2
    np.take(_INT4_NIBBLES, packed[:pairs], axis=0, out=row[: 2 * pairs].reshape(pairs, 2), mode="clip")
    if row.shape[0] % 2:
        row[-1] = _INT4_NIBBLES[packed[pairs], 0]
    row *= scale


@dataclass(frozen=True)
class HostTableReader:
    """Read-only lookup over one `HostTable` of the manifest."""

    name: str
    spec: HostTable
    data: np.ndarray  # [rows, cols], read-only over the map; int4: uint8 [rows, row_bytes], two values a byte
    scales: np.ndarray | None  # [rows] for "per_row"
    # Ids at or above this read row 0 (Gemma 3n's per-layer table is smaller than the vocab).
    row0_from: int | None = None
    mapping: mmap.mmap | None = None  # the read-only map under data and scales

    def release_pages(self) -> None:
        """Drop the map's pages from this process (MADV_DONTNEED; a read-only shared map holds
        none of its own, so a later lookup reads them back unchanged). The rows a prompt looked
        up, and with a fault-around window of 64 KiB on a warm page cache the pages beside them,
        otherwise stay resident: E2B, a 4064-token prompt, 0.15 GiB after the prefill."""
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mapping.madvise(mmap.MADV_DONTNEED)

    @classmethod
    def open(cls, folder: str | Path, name: str, spec: HostTable, row0_from: int | None = None) -> "HostTableReader":
        path = Path(folder) / spec.file
        rows, cols = (int(d) for d in spec.shape)
        if spec.scale_layout is None:
            if spec.dtype not in _FLOAT_DTYPES:
                raise ManifestError(
                    f"table {name!r}: dtype {spec.dtype!r} without a scale layout is not supported "
                    f"(float tables: {sorted(_FLOAT_DTYPES)}); upgrade gemma-runtime or re-export"
                )
        elif spec.scale_layout == "per_row":
            if spec.dtype not in _INT_DTYPES or spec.scale_dtype not in _SCALE_DTYPES or spec.scale_offset is None:
                raise ManifestError(
                    f"table {name!r}: per_row layout needs dtype in {sorted(_INT_DTYPES)}, scale_dtype in "
                    f"{sorted(_SCALE_DTYPES)} and a scale_offset; got dtype={spec.dtype!r}, "
                    f"scale_dtype={spec.scale_dtype!r}, scale_offset={spec.scale_offset!r}"
                )
        else:
            raise ManifestError(
                f"table {name!r}: scale layout {spec.scale_layout!r} is not supported by this runtime "
                f"(supported: None, 'per_row'); upgrade gemma-runtime or re-export"
            )
        width = row_bytes(spec.dtype, cols)
        if spec.row_bytes is not None and spec.row_bytes != width:
            raise ManifestError(
                f"table {name!r}: {spec.dtype} rows of {cols} values take {width} bytes, the manifest says "
                f"row_bytes={spec.row_bytes}; the manifest and the file disagree: re-export"
            )
        size = path.stat().st_size
        data_end = spec.data_offset + rows * width
        scale_end = 0
        if spec.scale_layout == "per_row":
            scale_end = spec.scale_offset + rows * np.dtype(spec.scale_dtype).itemsize
        if max(data_end, scale_end) > size:
            raise ManifestError(
                f"table {name!r}: {spec.file} holds {size} bytes but its layout needs "
                f"{max(data_end, scale_end)}; the manifest and the file disagree: re-export"
            )
        mapped = _map_for_random_reads(path)
        if spec.dtype == "int4":  # packed bytes [rows, row_bytes], decoded row by row on lookup
            data = np.frombuffer(mapped, np.uint8, rows * width, spec.data_offset).reshape(rows, width)
        else:
            data = np.frombuffer(mapped, np.dtype(spec.dtype), rows * cols, spec.data_offset).reshape(rows, cols)
        scales = None
        if spec.scale_layout == "per_row":
            scales = np.frombuffer(mapped, np.dtype(spec.scale_dtype), rows, spec.scale_offset)
        return cls(name, spec, data, scales, row0_from, mapped)

    @property
    def cols(self) -> int:
        return int(self.spec.shape[1])

    def lookup(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows for `ids` (1-D int) as float32 [len(ids), cols], written into `out` when given
        (the decode loop's preallocated inputs_embeds rows: no allocation per step)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.row0_from is not None:
            ids = np.where(ids >= self.row0_from, 0, ids)
        rows = self.spec.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            bad = int(ids[(ids < 0) | (ids >= rows)][0])
            raise ValueError(f"token id {bad} is outside table {self.name!r} ({rows} rows)")
        if out is None:
            out = np.empty((ids.size, self.cols), dtype=np.float32)
        elif out.shape != (ids.size, self.cols) or out.dtype != np.float32:
            raise ValueError(f"table {self.name!r}: out must be float32 {(ids.size, self.cols)}, got {out.dtype} {out.shape}")
        if self.spec.dtype == "int4":
            # row by row from the memory map into `out` (a contiguous stand-in if `out` is strided):
            # no packed or dequantized copy of the looked-up rows beside the output
            rows_out = out if out.flags.c_contiguous else np.empty_like(out)
            packed, scales = self.data, self.scales
            for k, i in enumerate(ids.tolist()):
                _dequantize_int4_row(packed[i], scales[i], rows_out[k])
            if rows_out is not out:
                np.copyto(out, rows_out)
            return out
        if self.data.dtype == np.float32:
            np.take(self.data, ids, axis=0, out=out)  # straight from the memory map into `out`
        else:
            np.copyto(out, self.data[ids])  # int8/float16 rows: converted on the way
        if self.scales is not None:
            out *= np.asarray(self.scales[ids], dtype=np.float32)[:, None]
        return out


TABLE_PARTS = ("data", "scales")


def table_input_arrays(table_inputs: dict[str, str], *tables: "HostTableReader | None") -> tuple[tuple[str, np.ndarray], ...]:
    """(graph input name, read-only array over the table's memory map) for each manifest
    `table_inputs` entry "TABLE.PART", from the export's open `tables` (None: a table it lacks): no
    copy, so a graph's Gather touches only the pages of the rows it reads (mapped MADV_RANDOM: no
    readahead around them)."""
    readers = {t.name: t for t in tables if t is not None}
    arrays = []
    for name, ref in table_inputs.items():
        table, _, part = ref.partition(".")
        reader = readers.get(table)
        if reader is None or part not in TABLE_PARTS:
            raise ManifestError(f"graph input {name!r} is bound to {ref!r}: not a part ({', '.join(TABLE_PARTS)}) "
                                f"of a host table of this export ({', '.join(sorted(readers))})")
        array = reader.data if part == "data" else reader.scales
        if array is None or (part == "data" and reader.spec.dtype == "int4"):
            raise ManifestError(f"graph input {name!r}: table {table!r} ({reader.spec.dtype}) has no {part} a graph can read")
        arrays.append((name, array))
    return tuple(arrays)
