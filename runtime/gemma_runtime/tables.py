"""Host tables: token id -> one row, read by memory map so a 1 GB table costs no RAM up front."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import HostTable, ManifestError

# Row dtypes this runtime dequantizes; anything else must fail loudly, never be misread.
_FLOAT_DTYPES = {"float32", "float16"}
_INT_DTYPES = {"int8"}
_SCALE_DTYPES = {"float32", "float16"}


@dataclass(frozen=True)
class HostTableReader:
    """Read-only lookup over one `HostTable` of the manifest."""

    name: str
    spec: HostTable
    data: np.memmap  # [rows, cols]
    scales: np.memmap | None  # [rows] for "per_row"
    # Ids at or above this read row 0 (Gemma 3n's per-layer table is smaller than the vocab).
    row0_from: int | None = None

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
        size = path.stat().st_size
        data_end = spec.data_offset + rows * cols * np.dtype(spec.dtype).itemsize
        scale_end = 0
        if spec.scale_layout == "per_row":
            scale_end = spec.scale_offset + rows * np.dtype(spec.scale_dtype).itemsize
        if max(data_end, scale_end) > size:
            raise ManifestError(
                f"table {name!r}: {spec.file} holds {size} bytes but its layout needs "
                f"{max(data_end, scale_end)}; the manifest and the file disagree: re-export"
            )
        data = np.memmap(path, dtype=spec.dtype, mode="r", offset=spec.data_offset, shape=(rows, cols))
        scales = None
        if spec.scale_layout == "per_row":
            scales = np.memmap(path, dtype=spec.scale_dtype, mode="r", offset=spec.scale_offset, shape=(rows,))
        return cls(name, spec, data, scales, row0_from)

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
        if self.data.dtype == np.float32:
            np.take(self.data, ids, axis=0, out=out)  # straight from the memory map into `out`
        else:
            np.copyto(out, self.data[ids])  # int8/float16 rows: converted on the way
        if self.scales is not None:
            out *= np.asarray(self.scales[ids], dtype=np.float32)[:, None]
        return out
