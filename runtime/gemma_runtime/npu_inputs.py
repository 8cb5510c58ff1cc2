"""Host-side inputs of the static NPU decoder graphs (numpy), from the manifest's `npu_inputs`.

An NPU graph (gemma-export --target qnn-htp) has no index arithmetic: what a CPU graph derives
from `position` and `valid` with Range/Mod/comparisons comes from the host, per attention kind K
(the manifest's NpuAttentionKind: "sliding", "global"):

    cos.K, sin.K   [T, head_dim]   rope tables of the chunk's positions position .. position+T-1
    mask_past.K    [T, S_K]        additive: 0 where a query may attend a cache slot, mask_value not
    mask_new.K     [T, T]          additive, the chunk's own rows: causal (and the sliding window)
    last           [1, 1, T]       one-hot of the last valid row (the graph picks it by a MatMul)

The same arithmetic as the exporter's torch functions (gemma_export/model/layers.py rope_tables,
attention_masks): the masks are equal, the rope angles equal bit for bit (the manifest records the
exporter's float32 inverse frequencies), cos/sin within one float32 step of torch's. The exporter's
driver (npu_driver.py) calls this module, so the graphs are calibrated on what the runtime feeds.
"""

from __future__ import annotations

import numpy as np

from .manifest import NpuAttentionKind, NpuInputs


def rope_tables(kind: NpuAttentionKind, head_dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, head_dim] float32 for absolute `positions` [T] (float32), rotate-half layout
    (the angles of the first half repeated). head_dim: the tables' width, 2 * len(inv_freq)."""
    if 2 * len(kind.inv_freq) != head_dim:
        raise ValueError(f"{kind.name}: {len(kind.inv_freq)} inverse frequencies for head_dim {head_dim}")
    inv_freq = np.asarray(kind.inv_freq, dtype=np.float32)
    freqs = (positions / np.float32(kind.rope_linear_factor))[:, None] * inv_freq[None, :]
    # the float32 angles, as torch makes them; cos/sin through float64 then rounded: within one
    # float32 step of torch's own (vectorized) cos/sin, nearer to it than numpy's float32 ones
    emb = np.concatenate((freqs, freqs), axis=-1).astype(np.float64)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def attention_masks(kind: NpuAttentionKind, position: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (True = may attend) of a chunk's queries over the past cache [T, S] and the
    chunk's own rows [T, T]. A global cache holds position s in slot s (slots >= position are not
    yet written); a ring (window set) of S slots holds in slot s the latest position q < position
    with q = s (mod S), if any, visible while it is less than `window` positions back. Padding
    rows sit after every real query, so causality hides them."""
    t = np.arange(chunk, dtype=np.int64)
    query = position + t
    slot = np.arange(kind.mask_length, dtype=np.int64)
    if kind.window is not None:
        last = position - 1
        slot_pos = last - np.mod(last - slot, kind.mask_length)  # floored mod, as torch.remainder
        past = (slot_pos >= 0)[None, :] & (slot_pos[None, :] > query[:, None] - kind.window)
        new = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - kind.window)
    else:
        past = np.broadcast_to((slot < position)[None, :], (chunk, kind.mask_length))
        new = t[None, :] <= t[:, None]
    return past, new


def host_inputs(spec: NpuInputs, position: int, valid: int, chunk: int) -> dict[str, np.ndarray]:
    """Everything but embeddings and caches, for a chunk of `chunk` rows of which the first `valid`
    are real, starting at absolute `position`: graph input name -> float32 array."""
    if not 1 <= valid <= chunk:
        raise ValueError(f"valid must be in 1..{chunk}, got {valid}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    positions = (position + np.arange(chunk, dtype=np.int64)).astype(np.float32)
    zero, masked = np.float32(0.0), np.float32(spec.mask_value)
    out: dict[str, np.ndarray] = {}
    for kind in spec.kinds:
        out[kind.cos], out[kind.sin] = rope_tables(kind, spec.head_dim, positions)
        past, new = attention_masks(kind, position, chunk)
        out[kind.mask_past] = np.where(past, zero, masked)
        out[kind.mask_new] = np.where(new, zero, masked)
    last = np.zeros((1, 1, chunk), dtype=np.float32)
    last[0, 0, valid - 1] = 1.0
    out[spec.last] = last
    return out


def input_names(spec: NpuInputs) -> list[str]:
    """The host inputs in graph order: cos/sin of every kind, then the mask pairs, then last."""
    return ([n for k in spec.kinds for n in (k.cos, k.sin)] + [n for k in spec.kinds for n in (k.mask_past, k.mask_new)]
            + [spec.last])
