"""Where pass inputs and outputs live: initializers inside the proto or in an external data file.

Passes take a ModelProto whose big initializers may be external references (onnx.load with
load_external_data=False), read one tensor at a time through a TensorStore and write each new
tensor through it as soon as it is made: with an output file, peak memory stays at one float
weight plus its quantized form, not the model twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_ALIGN_BIG = 4096  # page-aligned big tensors let onnxruntime map them
_BIG = 1 << 20


def _external(t: onnx.TensorProto) -> dict[str, str] | None:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


class TensorStore:
    """Reads initializers (inline, or external relative to `base_dir`); writes new ones inline
    (out_file None) or appended to `out_file`, whose name in the graph is `location`."""

    def __init__(self, base_dir: Path | None = None, out_file: Path | None = None, location: str | None = None):
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.out_file = Path(out_file) if out_file is not None else None
        self.location = location or (self.out_file.name if self.out_file else None)
        self._out = self.out_file.open("wb") if self.out_file is not None else None
        self.written: set[str] = set()  # names of the tensors already in out_file

    def read(self, t: onnx.TensorProto) -> np.ndarray:
        ext = _external(t)
        if ext is None:
            return numpy_helper.to_array(t)
        if self.base_dir is None:
            raise ValueError(f"initializer {t.name} is external ({ext['location']}) but the store has no base folder")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims, dtype=np.int64))
        offset = int(ext.get("offset", 0))
        # a plain read (not a memory map): the pages are ours to drop as soon as the caller does
        array = np.fromfile(self.base_dir / ext["location"], dtype=dtype, count=count, offset=offset)
        if array.size != count:
            raise ValueError(f"initializer {t.name}: {ext['location']} ends before its {count} elements")
        return array.reshape(tuple(t.dims))

    def write(self, name: str, array: np.ndarray, packed: tuple[int, tuple[int, ...]] | None = None) -> onnx.TensorProto:
        """`packed`: (ONNX data type, dims) of a 4-bit tensor whose bytes `array` (uint8) already
        holds, two elements a byte, the first in the low nibble (numpy has no 4-bit dtype)."""
        array = np.ascontiguousarray(array)
        data_type, dims = packed if packed is not None else (onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
        if self._out is None:
            if packed is None:
                return numpy_helper.from_array(array, name)
            return onnx.helper.make_tensor(name, data_type, dims, array.tobytes(), raw=True)
        t = onnx.TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        data = memoryview(array.reshape(-1).view(np.uint8))  # no copy: the largest weight is GiBs
        offset = self._out.tell()
        pad = -offset % (_ALIGN_BIG if len(data) >= _BIG else 16)
        self._out.write(b"\0" * pad)
        offset += pad
        self._out.write(data)
        self.written.add(name)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def copy(self, t: onnx.TensorProto) -> onnx.TensorProto:
        """`t` moved into this store's output (inline tensors that are small stay inline)."""
        if self._out is None or (_external(t) is None and len(t.raw_data) < 1024):
            return t
        return self.write(t.name, self.read(t))

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> "TensorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
