"""The out/ folder's schema: written by gemma-export, read by the runtime.

This module is the single definition of manifest.json. The exporter imports these
dataclasses to write what the runtime reads, so the two halves cannot drift apart.
Bump FORMAT_VERSION on any change a previous runtime could misread.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GemmaRuntimeError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(GemmaRuntimeError, ValueError):
    """manifest.json is missing, unreadable, or from an incompatible format version."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. Symbolic dimensions are strings (e.g. "T")."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """An ONNX graph in the folder and its I/O contract."""

    file: str
    data_file: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class HostTable:
    """A row-lookup table kept on the host: token id -> one row.

    Rows are stored row-major at `data_offset` in `file`, `shape = (rows, cols)`, each row
    `row_bytes` long. `scale_layout` is None for float tables ("float32", "float16"); "per_row"
    means an int table whose row r dequantizes as data[r] * scale[r] with `scale_dtype` scales at
    `scale_offset`. dtype "int8": one value a byte. dtype "int4": two signed (two's complement)
    4-bit values a byte, column 2j in the low nibble of byte j and column 2j+1 in its high nibble
    (MatMulNBits' order), row_bytes = ceil(cols / 2); an odd row's last high nibble is 0; its
    scales may be negative (the sign that puts a row's largest magnitude on -8).
    Rows already carry the embedding multiplier (sqrt(H) or sqrt(P)).
    """

    file: str
    dtype: str
    shape: tuple[int, int]
    data_offset: int = 0
    scale_layout: str | None = None
    scale_dtype: str | None = None
    scale_offset: int | None = None
    # None in manifests written before int4 tables: cols * the dtype's size
    row_bytes: int | None = None


# kv_layout values (CacheSpec says what each means); the shared-buffer ones are written by the
# graph in place. gemma-export writes them from here too.
KV_BLOCKS, KV_SHARED_BUFFER, KV_SHARED_WINDOWED = "past_and_new_blocks", "shared_buffer", "shared_buffer_windowed"
KV_LAYOUTS = (KV_BLOCKS, KV_SHARED_BUFFER, KV_SHARED_WINDOWED)
KV_IN_PLACE = (KV_SHARED_BUFFER, KV_SHARED_WINDOWED)


@dataclass(frozen=True)
class CacheSpec:
    """One KV buffer pair the runtime owns, for the layer `layer` that produces it.

    kv_layout "past_and_new_blocks":
      kind "global": `length` = max context, slot = absolute position.
      kind "sliding": `length` = sliding window, a ring, slot = position mod length.
      The graph takes `past_key`/`past_value` [1, kv_heads, length, head_dim] and returns
      the chunk's rows as `new_key`/`new_value` [1, kv_heads, T, head_dim].
    kv_layout "shared_buffer" (onnxruntime's GroupQueryAttention): every buffer is linear,
      `length` = max context, slot = absolute position (the op hides keys beyond a sliding
      window); `new_key`/`new_value` name the op's present outputs, the whole buffer, which
      the runtime binds to the `past_key`/`past_value` memory: the graph writes its rows there.
    kv_layout "shared_buffer_windowed": as "shared_buffer", except that a sliding layer's buffer
      is the op's windowed cache (sliding_window_cache=1): `length` = window + slack rows, rows
      0..L-1 hold the L most recent positions in order, L a function of the token count alone
      (prompt_cache.resident_rows); the op shifts the window down as it fills.
    """

    layer: int
    kind: str
    length: int
    kv_heads: int
    head_dim: int
    past_key: str
    past_value: str
    new_key: str
    new_value: str
    # in-place layouts: the (present_key, present_value) outputs of the KV-shared layers that read
    # this cache (Gemma 3n): their op writes this layer's rows again, in place, so the runtime binds
    # them to this buffer too. Absent from the JSON when empty.
    readers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PerLayerInputs:
    """Gemma 3n per-layer embeddings: graph input `per_layer_inputs` [1, T, num_layers, dim]."""

    num_layers: int
    dim: int
    vocab_size: int  # ids >= vocab_size read row 0


@dataclass(frozen=True)
class TokenIds:
    bos: int | None
    eos: int | None
    pad: int | None
    stop: tuple[int, ...]  # generation stops on any of these (generation_config.json's eos list)
    image: int | None = None  # the image soft-token placeholder id (Gemma 3n: <image_soft_token>)
    audio: int | None = None  # the audio soft-token placeholder id (<audio_soft_token>)
    boi: int | None = None  # begin/end of image, begin/end of audio (multimodal exports; older
    eoi: int | None = None  # manifests lack them)
    boa: int | None = None
    eoa: int | None = None


@dataclass(frozen=True)
class NpuAttentionKind:
    """One attention kind ("sliding" | "global") of the static NPU decoder graphs: what the host
    needs to compute that kind's rope tables and additive masks (npu_inputs.py).

    rope: angles of position p = (p / rope_linear_factor) * inv_freq, in float32, with
    inv_freq = 1 / rope_theta ** (arange(0, head_dim, 2) / head_dim) as the exporter computed it
    (float32; recorded because float32 pow implementations differ in the last bit of a few
    entries, which large positions magnify). Masks: mask_past [T, mask_length] over that kind's
    cache (window None: a global cache, slot s holds position s; else a ring of mask_length slots,
    slot = position mod mask_length, and keys more than window - 1 positions back are hidden),
    mask_new [T, T] over the chunk's own rows (causal, and the window)."""

    name: str  # the suffix of its graph inputs: cos.NAME, sin.NAME, mask_past.NAME, mask_new.NAME
    rope_theta: float
    rope_linear_factor: float  # 1.0 = no scaling
    inv_freq: tuple[float, ...]  # [head_dim / 2], float32 values
    mask_length: int  # S of mask_past: the length of this kind's caches
    window: int | None  # the sliding window; None for global attention
    cos: str
    sin: str
    mask_past: str
    mask_new: str


@dataclass(frozen=True)
class NpuInputs:
    """The host-computed inputs of static NPU decoder graphs (targets with static shapes: prefill
    with T = prefill_chunk, decode with T = 1), besides embeddings and caches:
    cos/sin [T, head_dim] and the additive masks (0 = may attend, mask_value = not) per attention
    kind in `kinds` order, and `last` [1, 1, T], the one-hot of the last valid row."""

    head_dim: int
    mask_value: float
    kinds: tuple[NpuAttentionKind, ...]
    last: str = "last"


@dataclass(frozen=True)
class Manifest:
    format_version: int
    family: str  # "gemma", "gemma3", "gemma3n"
    variant: str | None  # named variant (e.g. "gemma3-270m") or None for an unnamed checkpoint
    architecture: str  # Hugging Face architecture of the source checkpoint
    quant: str  # quantization recipe name ("fp32")
    target: str  # build target name (gemma-export's targets/NAME.toml)
    hidden_size: int
    vocab_size: int
    prefill_chunk: int  # T used for prefill
    max_context: int
    sliding_window: int | None
    # The decoder graph's chunk dimension is symbolic ("T"): the runtime runs it with
    # T = prefill_chunk for prefill and T = 1 for decode (one session, one copy of the weights).
    graphs: dict[str, GraphSpec]
    # "past_and_new_blocks": graph returns only new rows, runtime writes them; "shared_buffer":
    # the graph updates the runtime's buffers in place (CacheSpec)
    kv_layout: str
    caches: tuple[CacheSpec, ...]
    tables: dict[str, HostTable]  # "embed_tokens" always, "per_layer" for Gemma 3n
    per_layer_inputs: PerLayerInputs | None
    tokens: TokenIds
    files: dict[str, str]  # file name -> sha256 of every other file in the folder
    provenance: dict[str, Any] = field(default_factory=dict)
    tokenizer_files: tuple[str, ...] = ()
    # the target's execution providers (--provider names), most preferred first: the runtime's
    # default is the first one this onnxruntime has; empty in exports made before targets existed
    providers: tuple[str, ...] = ()
    # static NPU exports (graphs "prefill" and "decode", no "decoder"): their host inputs; absent
    # from the JSON of every other export
    npu_inputs: NpuInputs | None = None
    # decoder graph inputs that are parts of a host table, bound to its memory map once per load:
    # input name -> "TABLE.data" (the rows, [rows, cols] of the table's dtype) or "TABLE.scales"
    # ([rows] per_row scales). gemma-export's `--lm-head 4` reads its rescored rows from the tied
    # embed_tokens table this way. Absent from the JSON when empty.
    table_inputs: dict[str, str] = field(default_factory=dict)

    @property
    def table_files(self) -> frozenset[str]:
        """The files of the host tables: mapped, and read a row at a time."""
        return frozenset(t.file for t in self.tables.values())

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        if raw["npu_inputs"] is None:
            del raw["npu_inputs"]  # CPU/GPU manifests stay as runtimes before NPU exports read them
        if not raw["table_inputs"]:
            del raw["table_inputs"]
        for cache in raw["caches"]:
            if not cache["readers"]:
                del cache["readers"]  # manifests without KV-shared readers read as before
        return json.dumps(raw, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest format version {version!r} is not supported by this runtime "
                f"(it reads version {FORMAT_VERSION}); re-export with a matching gemma-export "
                f"or install the matching gemma-runtime"
            )
        try:
            return cls(
                **{
                    **raw,
                    "graphs": {k: _graph(v) for k, v in raw["graphs"].items()},
                    "caches": tuple(_cache(c) for c in raw["caches"]),
                    "tables": {k: _table(v) for k, v in raw["tables"].items()},
                    "per_layer_inputs": (
                        PerLayerInputs(**raw["per_layer_inputs"]) if raw.get("per_layer_inputs") else None
                    ),
                    "tokens": TokenIds(**{**raw["tokens"], "stop": tuple(raw["tokens"]["stop"])}),
                    "tokenizer_files": tuple(raw.get("tokenizer_files", ())),
                    "providers": tuple(raw.get("providers", ())),
                    "npu_inputs": _npu_inputs(raw["npu_inputs"]) if raw.get("npu_inputs") else None,
                    "table_inputs": dict(raw.get("table_inputs", {})),
                }
            )
        except (KeyError, TypeError) as err:
            raise ManifestError(f"manifest.json is malformed: {err}") from err


def _cache(raw: dict[str, Any]) -> CacheSpec:
    return CacheSpec(**{**raw, "readers": tuple(tuple(pair) for pair in raw.get("readers", ()))})


def _tensor(raw: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=raw["name"], dtype=raw["dtype"], shape=tuple(raw["shape"]))


def _graph(raw: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        file=raw["file"],
        data_file=raw.get("data_file"),
        inputs=tuple(_tensor(t) for t in raw["inputs"]),
        outputs=tuple(_tensor(t) for t in raw["outputs"]),
    )


def _npu_inputs(raw: dict[str, Any]) -> NpuInputs:
    kinds = tuple(NpuAttentionKind(**{**k, "inv_freq": tuple(k["inv_freq"])}) for k in raw["kinds"])
    return NpuInputs(**{**raw, "kinds": kinds})


def _table(raw: dict[str, Any]) -> HostTable:
    return HostTable(**{**raw, "shape": tuple(raw["shape"])})


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise ManifestError(f"{folder} is not a folder; expected an export folder made by gemma-export")
    if not path.is_file():
        raise ManifestError(f"{path} not found: {folder} is not an export folder made by gemma-export")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} cannot be read: {err}") from err
    return Manifest.from_dict(raw)
