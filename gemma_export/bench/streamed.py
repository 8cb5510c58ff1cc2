"""Bytes of weights one decode step reads, per engine's own model file: every weight it
multiplies by, but not a table it only gathers one row from (an embedding looked up by id).
Pure functions over what the files declare (ONNX initializers, GGUF tensors), plus readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# onnx TensorProto data types -> bytes per element (4-bit types packed two to a byte: None)
_ONNX_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_ONNX_4BIT = {21, 22}  # UINT4, INT4
# Ops whose data input reads only the rows named by the ids (an embedding lookup).
GATHER_OPS = ("Gather", "GatherBlockQuantized")


@dataclass(frozen=True)
class Streamed:
    weights: int  # bytes read per decode step
    gathered: int  # bytes in tables read one row at a time (left out of `weights`)


def split_gathered(sizes: dict[str, int], uses: dict[str, list[str]]) -> Streamed:
    """sizes: initializer -> bytes; uses: initializer -> op types that read it. A tensor read
    only by gather ops is a lookup table; every other tensor is read whole each step."""
    gathered = {n for n, ops in uses.items() if ops and all(op in GATHER_OPS for op in ops)}
    return Streamed(sum(b for n, b in sizes.items() if n not in gathered),
                    sum(b for n, b in sizes.items() if n in gathered))


def _initializer_bytes(t) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    count = 1
    for d in t.dims:
        count *= d
    if t.data_type in _ONNX_4BIT:
        return (count + 1) // 2
    return count * _ONNX_ELEMENT_BYTES[t.data_type]


def onnx_streamed(path: Path) -> Streamed:
    """From an ONNX file's initializers (external data sized by its declared length; nothing
    loaded). Initializers used in subgraphs count as read."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    uses: dict[str, list[str]] = {name: [] for name in sizes}

    def visit(graph) -> None:
        for node in graph.node:
            for name in node.input:
                if name in uses:
                    uses[name].append(node.op_type)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub)

    visit(model.graph)
    return split_gathered(sizes, uses)


def onnx_kv_element_bytes(path: Path, past_prefix: str) -> int:
    """Bytes per element of the first graph input whose name starts with `past_prefix`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for i in model.graph.input:
        if i.name.startswith(past_prefix):
            return _ONNX_ELEMENT_BYTES[i.type.tensor_type.elem_type]
    raise ValueError(f"{path}: no graph input named {past_prefix}*")


def gguf_streamed_sizes(sizes: dict[str, int]) -> Streamed:
    """GGUF tensors (name -> bytes): llama.cpp gathers rows of token_embd.weight, and multiplies
    by it whole only when there is no separate output.weight (a tied LM head)."""
    table = "token_embd.weight"
    if "output.weight" in sizes and table in sizes:
        return Streamed(sum(sizes.values()) - sizes[table], sizes[table])
    return Streamed(sum(sizes.values()), 0)


def gguf_streamed(path: Path) -> Streamed:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return gguf_streamed_sizes({t.name: int(t.n_bytes) for t in reader.tensors})
