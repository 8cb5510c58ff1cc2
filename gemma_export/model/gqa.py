"""Attention as onnxruntime's GroupQueryAttention (com.microsoft), for targets whose provider has it.

The KV contract is the op's own (DESIGN.md allows it; the manifest's kv_layout says which):
a global layer's buffer is `[1, kv_heads, max_context, head_dim]`, linear (slot = position); a
sliding layer's, where its window is shorter than the context, is the op's windowed cache
(`sliding_window_cache=1`, kv_layout "shared_buffer_windowed"): `[1, kv_heads, C, head_dim]` with
C = window + window / 8, its rows 0..L-1 the L most recent positions in order, L a function of the
token count alone (`resident_rows`); the op evicts by shifting the window down once every
C - window + 1 tokens. The graph's `present_key.N` / `present_value.N` outputs are the same
buffers: the runtime binds them to the memory of `past_key.N` / `past_value.N`, and the op writes
the chunk's rows in place (past_present_share_buffer). The op reads only the resident rows, where
the two-block graph reads all of its buffers every step.

Measured (bench of the op alone, Gemma 3 270M's shapes: 4 heads, 1 KV head, d 256, window 512, 2
threads): a decode step of one sliding layer took 126 us at 1024 tokens and 294 at 3000 with the
linear buffer of 4096, 71 and 71 with C = 576, 103 and 103 with C = 512 (a shift every token).
The whole 270M int4 `--lm-head 4` export, windowed against linear (bench/compare_exports.py, median
of 5 interleaved runs, 128 new tokens, same greedy tokens): decode 0.955x after a 128-token prompt
(the window not yet full: the op's windowed path costs a little more there), 1.047x after 1024,
prefill 0.97x / 1.11x; the KV cache at 4096 positions 144 -> 41 MiB (`gemma-export bench` peak
RSS 672 MiB in the last stop's run of the linear one, 578 in this one).

Gemma 3n's KV-shared layers (model/text.py `_fused`): the layer's node takes its producer's present
as past and the producer's key/value inputs as its own, so it writes the producer's rows into the
producer's buffer a second time, the same values, in place: the graph outputs `present_key.N` /
`present_value.N` of a shared layer N are bound by the runtime to the producer's buffer (manifest
CacheSpec.readers). A producer that KV-shared layers read keeps a linear buffer: on a windowed one
the second node would shift the window a second time (`layer_windowed_rows`).

Rotary runs inside the op (do_rotary, rotate-half) from [max_context, head_dim/2] tables, at
positions seqlens_k + 1 - T .. seqlens_k. The chunk is never padded on these targets (T is
symbolic), so `position` alone gives seqlens_k = position + T - 1.

The op is a torch custom op whose eager body is the same math in torch (the reference the graph
is checked against is Hugging Face's eager model, tests/test_parity.py); torch.onnx.export turns
it into the one ONNX node through CUSTOM_TRANSLATION.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnxscript
import torch
from gemma_runtime.prompt_cache import resident_rows  # the op's windowed layout, shared with the runtime

from ..variants import SLIDING, Variant


def _schema() -> onnx.defs.OpSchema:
    """The part of com.microsoft's GroupQueryAttention schema we emit: onnx's Python package has no
    contrib schemas, and torch.onnx's graph builder needs one to make the node."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    ints, floats = onnx.defs.OpSchema.AttrType.INT, onnx.defs.OpSchema.AttrType.FLOAT
    inputs = [P(n, "M" if n in ("seqlens_k", "total_sequence_length") else "T")
              for n in ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length",
                        "cos_cache", "sin_cache")]
    return onnx.defs.OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=inputs, outputs=[P(n, "T") for n in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[A("num_heads", ints, ""), A("kv_num_heads", ints, ""), A("scale", floats, ""),
                    A("local_window_size", ints, ""), A("do_rotary", ints, ""), A("rotary_interleaved", ints, ""),
                    A("sliding_window_cache", ints, "")],
    )


_GQA = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", _schema())

# rows of a windowed sliding cache beyond the window, as a fraction of it (64 for Gemma 3's 512):
# the op shifts the window down once every slack + 1 tokens instead of every token (see the module
# docstring for the measurement), and reads at most that many rows more
WINDOW_SLACK_DIVISOR = 8


def windowed_capacity(window: int, max_context: int) -> int | None:
    """Rows of a sliding layer's windowed cache, or None where the window covers the whole
    context (the layer then keeps a linear buffer, like a global one)."""
    if window <= 0 or window >= max_context:
        return None
    return min(window + max(1, window // WINDOW_SLACK_DIVISOR), max_context)


def layer_windowed_rows(variant: Variant, layer: int, max_context: int) -> int | None:
    """Rows of the windowed cache of a layer that owns one, or None where its buffer is linear: a
    global layer, a window that covers the context, or a cache that Gemma 3n's KV-shared layers
    read too. Those layers' ops write the producer's rows into its buffer a second time (in place,
    the same values); on a windowed buffer the second op would shift the window a second time."""
    if variant.layer_types[layer] != SLIDING or not variant.sliding_window:
        return None
    if any(variant.kv_source(i) == layer for i in range(variant.num_layers) if i != layer):
        return None
    return windowed_capacity(variant.sliding_window, max_context)


@dataclass(frozen=True)
class GqaInputs:
    """What every GroupQueryAttention node of one layer kind shares, computed once per graph."""

    seqlens_k: torch.Tensor  # [1] int32: position + T - 1
    total: torch.Tensor  # [] int32: position + T
    cos: torch.Tensor  # [max_context, head_dim/2]
    sin: torch.Tensor
    window: int  # keys a query may see, itself included; -1: no limit
    windowed: bool = False  # the cache buffers are the op's windowed ones (sliding_window_cache)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s


@torch.library.custom_op("gemma_export::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int, scale: float,
                          window: int, windowed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1,T,H*d], k/v [1,T,KV*d] (not yet roped), past [1,KV,S,d] -> (out [1,T,H*d], present key,
    present value [1,KV,S,d]): the eager meaning of the ONNX node. windowed: past holds the
    resident_rows most recent positions in rows 0.. (sliding_window_cache), else slot = position."""
    chunk, dim = q.shape[1], past_key.shape[-1]
    start = int(seqlens_k.reshape(-1)[0]) + 1 - chunk
    positions = torch.arange(start, start + chunk)
    q = _rotate(q.reshape(1, chunk, num_heads, dim).transpose(1, 2), cos[positions], sin[positions])
    k = _rotate(k.reshape(1, chunk, kv_heads, dim).transpose(1, 2), cos[positions], sin[positions])
    v = v.reshape(1, chunk, kv_heads, dim).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    if windowed:
        capacity = past_key.shape[2]
        held = resident_rows(start, capacity, window)
        keys = torch.cat((past_key[:, :, :held], k), 2)  # positions start - held .. start + chunk - 1
        values = torch.cat((past_value[:, :, :held], v), 2)
        first = start - held
        kept = resident_rows(start + chunk, capacity, window)
        present_key[:, :, :kept], present_value[:, :, :kept] = keys[:, :, -kept:], values[:, :, -kept:]
    else:
        present_key[:, :, start:start + chunk], present_value[:, :, start:start + chunk] = k, v
        keys, values, first = present_key[:, :, :start + chunk], present_value[:, :, :start + chunk], 0
    keys = keys.repeat_interleave(num_heads // kv_heads, dim=1)
    values = values.repeat_interleave(num_heads // kv_heads, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    key_pos = torch.arange(first, start + chunk)[None, :]
    allowed = key_pos <= positions[:, None]
    if window > 0:
        allowed &= key_pos > positions[:, None] - window
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(1, chunk, num_heads * dim)
    return out, present_key, present_value


@group_query_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total, cos, sin, num_heads, kv_heads, scale, window, windowed=0):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


def _onnx_group_query_attention(q, k, v, past_key, past_value, seqlens_k, total, cos, sin, num_heads: int,
                                kv_heads: int, scale: float, window: int, windowed: int = 0):
    return _GQA(q, k, v, past_key, past_value, seqlens_k, total, cos, sin, num_heads=num_heads, kv_num_heads=kv_heads,
                scale=scale, local_window_size=window, do_rotary=1, rotary_interleaved=0, sliding_window_cache=windowed)


CUSTOM_TRANSLATION = {torch.ops.gemma_export.group_query_attention.default: _onnx_group_query_attention}
