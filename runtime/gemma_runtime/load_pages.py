"""Keep the weights file's pages out of the resident set while onnxruntime loads and after.

onnxruntime maps a graph's external data (decoder.data) and prepacks its weights into memory of its
own (MatMulNBits codes with scales and block sums, float MatMul weights); a run then reads the
packed copies. The mapped pages that the prepacking read stay resident until the load ends (and
some after it), so the load's peak holds the weights twice. Measured (VmHWM of the session's
creation, 2 threads):

    export                                       onnxruntime maps     own map, released while loading
    E2B-shaped int4 --lm-head 4 (random weights)     2.40 GiB                 2.11 GiB
    Gemma 3 270M fp32                                1.68 GiB                 1.56 GiB

(the fp32 LM head's prepacking reads its 640 MiB column panel by column panel, touching every page
in each, so its pages come back as fast as they leave).

On the CPU provider (`OwnMappedWeights`): the runtime maps the file read-only itself, hands every
external initializer to onnxruntime as a user initializer over that map (SessionOptions.
add_initializer: no copy), and while the session is being made (onnxruntime releases the GIL) a
thread advises the map MADV_DONTNEED every few milliseconds. A read-only shared map holds no page of
its own, so dropped pages are the file's, read back unchanged when a kernel touches them again; the
map is advised MADV_RANDOM after the load, so such a read brings one page, not a readahead window.
The graph's initializer list is read with protobuf (onnxruntime's own dependency) from a descriptor
of the few ONNX fields needed, since the runtime does not depend on the onnx package.

Elsewhere (other providers, the graph cache, a dtype numpy cannot view such as int4): `release`
after the load advises onnxruntime's own mappings that hold no written page.

Linux only (/proc/self/smaps, madvise); elsewhere nothing is advised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux, every architecture
_RELEASE_INTERVAL_S = 0.005
_LINUX = sys.platform.startswith("linux")

# ONNX TensorProto.DataType -> numpy (the types our graphs store externally; int4/uint4 have none)
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
           10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_EXTERNAL = 1  # TensorProto.DataLocation EXTERNAL


@cache
def _model_class():
    """A protobuf message class for the part of onnx.ModelProto read here: graph.initializer's
    dims, data_type, name, external_data and data_location (field numbers of onnx.proto3)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="gemma_onnx_subset.proto", package="gemma_onnx_subset",
                                               syntax="proto2")

    def message(name, fields):
        m = proto.message_type.add(name=name)
        for fname, number, kind, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".gemma_onnx_subset.{type_name}"

    rep, opt = field.LABEL_REPEATED, field.LABEL_OPTIONAL
    message("Entry", [("key", 1, field.TYPE_STRING, opt, None), ("value", 2, field.TYPE_STRING, opt, None)])
    message("Tensor", [("dims", 1, field.TYPE_INT64, rep, None), ("data_type", 2, field.TYPE_INT32, opt, None),
                       ("name", 8, field.TYPE_STRING, opt, None),
                       ("external_data", 13, field.TYPE_MESSAGE, rep, "Entry"),
                       ("data_location", 14, field.TYPE_INT32, opt, None)])
    message("Graph", [("initializer", 5, field.TYPE_MESSAGE, rep, "Tensor")])
    message("Model", [("graph", 7, field.TYPE_MESSAGE, opt, "Graph")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("gemma_onnx_subset.Model"))


@dataclass(frozen=True)
class _External:
    name: str
    location: str
    offset: int
    length: int
    dtype: type
    dims: tuple[int, ...]


def _external_initializers(graph: Path) -> list[_External] | None:
    """The graph's external initializers, or None where one has a type numpy cannot view."""
    model = _model_class()()
    model.ParseFromString(graph.read_bytes())
    found = []
    for t in model.graph.initializer:
        if t.data_location != _EXTERNAL:
            continue
        if t.data_type not in _DTYPES:
            return None
        ext = {e.key: e.value for e in t.external_data}
        found.append(_External(t.name, ext["location"], int(ext.get("offset", 0)), int(ext["length"]),
                               _DTYPES[t.data_type], tuple(t.dims)))
    return found


class OwnMappedWeights:
    """A graph's external initializers over this runtime's own read-only maps of their files."""

    def __init__(self, graph: Path, tensors: list[_External]):
        self._maps: dict[str, mmap.mmap] = {}
        self.values: list[tuple[str, ort.OrtValue]] = []
        for t in tensors:
            mapped = self._maps.get(t.location)
            if mapped is None:
                with open(graph.parent / t.location, "rb") as f:
                    mapped = self._maps[t.location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            count = t.length // np.dtype(t.dtype).itemsize
            if t.offset + t.length > len(mapped) or count != int(np.prod(t.dims, dtype=np.int64)):
                raise ValueError(f"{graph.name}: initializer {t.name} does not fit {t.location} ({t.offset}+{t.length})")
            array = np.frombuffer(mapped, dtype=t.dtype, count=count, offset=t.offset).reshape(t.dims)
            self.values.append((t.name, ort.OrtValue.ortvalue_from_numpy(array)))  # wraps, no copy

    @classmethod
    def of(cls, graph: Path) -> "OwnMappedWeights | None":
        """None where this route does not apply (not Linux, no external data, an int4 tensor)."""
        if not _LINUX:
            return None
        tensors = _external_initializers(graph)
        return cls(graph, tensors) if tensors else None

    def add_to(self, options: ort.SessionOptions) -> None:
        for name, value in self.values:
            options.add_initializer(name, value)

    def release(self) -> None:
        for mapped in self._maps.values():
            mapped.madvise(_MADV_DONTNEED)

    @contextmanager
    def released_while_loading(self):
        """Drop the maps' pages every few ms while the block runs (onnxruntime creating the session,
        GIL released), once more at the end, then advise them MADV_RANDOM."""
        done = threading.Event()

        def drop():
            while not done.wait(_RELEASE_INTERVAL_S):
                self.release()

        thread = threading.Thread(target=drop, name="gemma-weights-release", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.release()
            for mapped in self._maps.values():
                mapped.madvise(mmap.MADV_RANDOM)


def _clean_mappings(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of `path` that hold no page of their own: every
    resident page is the file's (smaps "Anonymous: 0 kB"). onnxruntime maps external data
    private and writable (rw-p) but does not write it; a written page would show as Anonymous
    and keep its mapping out of the advice, which would discard it."""
    target = str(path.resolve())
    found, current = [], None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                current = None
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    current = tuple(int(x, 16) for x in fields[0].split("-"))
            elif current is not None and fields[:1] == ["Anonymous:"]:
                if int(fields[1]) == 0:
                    found.append(current)
                current = None
    return found


def release(path: Path | None) -> int | None:
    """After a load: advise every clean mapping of `path` in this process MADV_RANDOM (a later read
    brings one page, not a fault-around window) and MADV_DONTNEED; returns the bytes advised, or
    None where there is no file or no such advice (not Linux)."""
    if path is None or not _LINUX:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for start, end in _clean_mappings(path):
        for advice in (mmap.MADV_RANDOM, _MADV_DONTNEED):
            if libc.madvise(start, end - start, advice) != 0:
                raise OSError(ctypes.get_errno(), f"madvise({advice}) of {path.name}'s mapping failed")
        advised += end - start
    return advised


def drop_cached_pages(fd: int) -> None:
    """Evict a file's clean pages from the page cache (written back first, so the export's own
    pages go too). For the host tables that the runtime maps and reads a row at a time: a plain
    read (the hash, the exporter's write) leaves them cached in large folios, and Linux 6.x maps
    a whole folio into the process on a fault, so each row a step gathers then brought up to 2 MiB
    into the RSS (E2B: 372 MiB of embed_tokens.bin after one decode step's 512 rescored rows;
    evicted first: 2 MiB). Pages read through the MADV_RANDOM map come back one at a time."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        os.fdatasync(fd)  # dirty pages are not evicted
    except OSError:
        pass  # a read-only file system holds no dirty page
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
