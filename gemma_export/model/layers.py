"""Building blocks shared by the Gemma text decoders, written for export: static shapes, no
data-dependent control flow, the KV cache as explicit tensors."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..variants import SLIDING, Variant


class RMSNorm(nn.Module):
    """x / rms(x) * weight. Gemma's (1 + w) form is folded into `weight` when weights load
    (Variant.norm_shift), so the graph has one Mul per norm."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return x if self.weight is None else x * self.weight


def activation(name: str):
    return {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}[name]


def rope_inv_freq(variant: Variant, layer_type: str) -> torch.Tensor:
    """1 / theta^(2i / head_dim), [head_dim / 2] float32, as Hugging Face computes it (torch's float32
    pow, which differs from a correctly rounded one in the last bit of a few entries: NPU manifests
    record these values, so the runtime's host angles are these bits too)."""
    dim = variant.head_dim
    return 1.0 / (variant.rope_theta[layer_type] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_tables(variant: Variant, layer_type: str, positions: torch.Tensor):
    """cos, sin [T, head_dim] for absolute `positions` [T] (float)."""
    inv_freq = rope_inv_freq(variant, layer_type)
    freqs = (positions / variant.rope_linear_factor[layer_type])[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [1, heads, T, d]; rotate-half form, as Hugging Face Gemma checkpoints expect."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_masks(variant: Variant, layer_type: str, cache_len: int, position, chunk: int):
    """Boolean masks (True = may attend) of a chunk's queries over the past cache and the new rows.

    position: [1] int64, absolute position of the chunk's first token.
    Past block [T, S]: a global cache holds position s in slot s; a sliding cache is a ring whose
    slot s holds the latest position q < position with q = s (mod S), if any.
    New block [T, T]: causal; padding keys sit after every real query so causality hides them.
    Sliding layers also hide keys more than `sliding_window - 1` positions back.
    """
    t = torch.arange(chunk, dtype=torch.int64)
    query_pos = position + t  # [T]
    slot = torch.arange(cache_len, dtype=torch.int64)
    sliding = layer_type == SLIDING and variant.sliding_window is not None
    if sliding:
        last = position - 1
        slot_pos = last - torch.remainder(last - slot, cache_len)  # [S]
        past = (slot_pos >= 0)[None, :] & (slot_pos[None, :] > query_pos[:, None] - variant.sliding_window)
    else:
        past = (slot < position)[None, :].expand(chunk, cache_len)
    new = t[None, :] <= t[:, None]
    if sliding:
        new = new & (t[None, :] > t[:, None] - variant.sliding_window)
    return past, new


def two_block_attention(q, k_past, v_past, k_new, v_new, past_mask, new_mask, scale: float, softcap):
    """Attention over the past cache and the chunk's new rows without joining them.

        q [1,H,T,d] -> [1,KV,G*T,d]  (grouped query heads share their kv head: no repeat of K/V)
        scores_past = q @ k_past^T    [1,KV,G*T,S]
        scores_new  = q @ k_new^T     [1,KV,G*T,T]
        p = softmax(concat(scores_past, scores_new))   (only the small score rows are joined)
        out = p_past @ v_past + p_new @ v_new

    No copy of the cache is made: keys and values are only read.
    """
    _, heads, chunk, dim = q.shape
    kv_heads, cache_len = k_past.shape[1], k_past.shape[2]
    groups = heads // kv_heads
    q = q.reshape(1, kv_heads, groups * chunk, dim)
    scores_past = torch.matmul(q, k_past.transpose(-1, -2)) * scale
    scores_new = torch.matmul(q, k_new.transpose(-1, -2)) * scale
    if softcap is not None:
        scores_past = torch.tanh(scores_past / softcap) * softcap
        scores_new = torch.tanh(scores_new / softcap) * softcap
    # [T,S] masks broadcast over the group axis: view scores as [1,KV,G,T,*]
    scores_past = scores_past.reshape(1, kv_heads, groups, chunk, cache_len)
    scores_new = scores_new.reshape(1, kv_heads, groups, chunk, -1)
    if past_mask.dtype == torch.bool:
        neg = torch.tensor(float("-inf"))
        scores_past, scores_new = torch.where(past_mask, scores_past, neg), torch.where(new_mask, scores_new, neg)
    else:  # additive float masks from the host (NPU graphs, model/npu_text.py): no -inf in the graph
        scores_past, scores_new = scores_past + past_mask, scores_new + new_mask
    probs = torch.softmax(torch.cat((scores_past, scores_new), dim=-1), dim=-1)
    probs = probs.reshape(1, kv_heads, groups * chunk, -1)
    out = torch.matmul(probs[..., :cache_len], v_past) + torch.matmul(probs[..., cache_len:], v_new)
    return out.reshape(1, heads, chunk, dim)


def linear(in_dim: int, out_dim: int) -> nn.Linear:
    return nn.Linear(in_dim, out_dim, bias=False)


def gaussian_topk_multiplier(sparsity: float) -> float:
    """Normal icdf(sparsity): the std multiplier of Gemma 3n's gaussian top-k, precomputed so the
    graph needs no erfinv."""
    # computed as the reference does (float32, torch's icdf), on the CPU even while the model is
    # being built on the meta device
    p = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
    return float(torch.erfinv(2 * p - 1) * torch.tensor(2.0, device="cpu").sqrt())


SQRT2_INV = 1.0 / math.sqrt(2.0)
