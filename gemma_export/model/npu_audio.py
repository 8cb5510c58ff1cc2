"""The audio encoder as NPU targets need it: the same modules and weights as model/audio.py's
AudioEncoder (built for the NPU graph's number of frames), with the forms the QNN HTP takes.

    input_features      [1, F, 128] float32   log-mel, the first F frames of the 30 s-padded features
    input_features_mask [1, F]      float32   1.0 = real frame, 0.0 = padding (not bool: the mask
                                              only scales and offsets tensors, so it stays a number)
      -> audio_embeds   [1, soft_tokens, H]

What differs from AudioEncoder.forward, and why:
- the cumulative group norm's running mean and variance: CumSum (not an HTP op) divided by the
  element count becomes a per-step mean and one MatMul with a constant averaging matrix
  (NpuCumulativeGroupNorm): the output is the running mean itself, whose range is the activations'
  own (a uint16 grid over a running *sum* would leave the first steps a few dozen steps of
  resolution), and every column of the matrix holds one value, which int8 per-channel weights store
  exactly.
- the attention mask: the eager `where(allowed, logits, finfo.min)` puts -3.4e38 in a tensor the
  QDQ graph must quantize (a uint16 step of 5e33). The logits are soft-capped to [-cap, cap] before
  it, so an additive mask of MASK_FACTOR * -cap leaves every masked logit at least cap below every
  unmasked one (exp(-50) ~ 2e-22 of weight for cap 50) over a range uint16 resolves to ~0.008
  (with npu_encoders' 2x range headroom).
  The mask is computed once from the frame mask and shared by every layer.
- bool logic (Cast, Greater, And, Where) becomes products with the 0/1 float mask.
- the index_select of the attention context (a Gather: the HTP fails to allocate it) becomes
  strided views: pad, cut into blocks, neighbouring blocks side by side (`context`); the frame
  mask's every-4th gather a strided Slice; attention tensors stay at rank 4 (the 5-D Tanh was not
  taken).
- RMS norms are RMSNormalization ops (model/npu_norms.py), which the encoder owns from here on.
Only rows that no valid key reaches (deep in the padding) differ from the eager model: the eager
softmax spreads them uniformly, here by their logits; such steps reach no valid step (attention
masks them as keys, the light conv zeroes them first) and the output replaces them with the padding
embedding, as AudioEncoder does.
"""

from __future__ import annotations

import torch
from torch import nn

from .audio import AudioEncoder, ChunkedLocalAttention, ConformerBlock, CumulativeGroupNorm, SSCPConvBlock
from .npu_norms import with_fused_rms_norms

MASK_FACTOR = 3.0  # additive mask = -MASK_FACTOR * logit cap


class NpuCumulativeGroupNorm(nn.Module):
    """CumulativeGroupNorm with the running statistics as a MatMul: the per-step means over
    (freq, channels) times the averaging matrix A [T, T], A[s, t] = 1 / (t + 1) for s <= t (the
    eager count (t + 1) * F * C, its F * C taken by the per-step mean). Every entry is at least 1 / T:
    onnxruntime's quantizer widens a weight channel's range to at least 1e-4 (MinimumRealRange), so
    the per-element 1 / ((t + 1) * F * C) would lose its late columns to rounding."""

    def __init__(self, norm: CumulativeGroupNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight
        steps = norm.count.numel()
        upper = torch.triu(torch.ones(steps, steps))  # s <= t
        self.register_buffer("average", upper / torch.arange(1, steps + 1, dtype=torch.float32).view(1, steps),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, T, F, C]
        steps = x.shape[1]
        mean = torch.matmul(x.mean(dim=(2, 3)), self.average).reshape(1, steps, 1, 1)
        d = x - mean
        var = torch.matmul((d * d).mean(dim=(2, 3)), self.average).reshape(1, steps, 1, 1)
        return d * torch.rsqrt(var + self.eps) * self.weight


def _sscp_block(block: SSCPConvBlock, norm: NpuCumulativeGroupNorm, x: torch.Tensor) -> torch.Tensor:
    x = block.conv(nn.functional.pad(x, block.padding))
    return torch.relu(norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def context(attn: ChunkedLocalAttention, x: torch.Tensor) -> torch.Tensor:
    """ChunkedLocalAttention._context without its Gather (the HTP takes no Gather here): [1, T, ...]
    -> [U, C, ...]. Block u's context is padded steps [u*W, u*W + C): with the time axis zero-padded
    and cut into blocks of W, that is blocks u .. u+k-1 side by side (k = ceil(C / W)), cut to C."""
    spec, u = attn.spec, attn.blocks
    w, c = spec.chunk_size, spec.context_size
    k = -(-c // w)
    before = attn.pad_context[0]
    total = (u + k - 1) * w
    rest = tuple(x.shape[2:])
    pad = [0, 0] * len(rest) + [before, total - x.shape[1] - before]
    blocks = nn.functional.pad(x, pad).reshape(u + k - 1, w, *rest)
    return torch.cat([blocks[j:j + u] for j in range(k)], dim=1)[:, :c]


def attention_mask(attn: ChunkedLocalAttention, valid: torch.Tensor) -> torch.Tensor:
    """Additive mask [1, U, W, C]: 0 where a query may attend a context slot (the key is a real
    frame and inside the local causal window), -MASK_FACTOR * cap elsewhere; valid [1, T] float."""
    allowed = context(attn, valid).unsqueeze(1) * attn.causal.to(valid.dtype)  # [U, 1, C] * [W, C] -> [U, W, C]
    return ((allowed - 1.0) * (MASK_FACTOR * attn.spec.logit_cap)).unsqueeze(0)


def _attention(attn: ChunkedLocalAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ChunkedLocalAttention.forward with the additive mask in place of its boolean one, every
    tensor of rank 4 at most (heads N leading, the batch of 1 dropped: the HTP's elementwise ops
    stop at rank 4)."""
    spec, u = attn.spec, attn.blocks
    n, h, w, c = spec.num_heads, spec.head_dim, spec.chunk_size, spec.context_size
    q = attn.q_proj(x).reshape(1, attn.steps, n, h)
    k = attn.k_proj(x).reshape(1, attn.steps, n, h)
    v = attn.v_proj(x).reshape(1, attn.steps, n, h)
    q = q * attn.q_scale * nn.functional.softplus(attn.per_dim_scale).view(1, 1, 1, h)
    q_blocks = nn.functional.pad(q, (0, 0, 0, 0, 0, u * w - attn.steps)).reshape(u * w, n, h).permute(1, 0, 2)  # [N, UW, h]
    k_ctx = context(attn, k).permute(2, 0, 3, 1)  # [U, C, N, h] -> [N, U, h, C]
    v_ctx = context(attn, v).permute(2, 0, 1, 3)  # [N, U, C, h]

    rel = attn.relative_position_embedding
    sin_emb = rel.pos_proj(rel.timing)
    span = sin_emb.shape[0]
    term_ac = torch.matmul(q_blocks.reshape(n, u, w, h), k_ctx)  # [N, U, W, C]
    s = sin_emb.reshape(span, n, h).permute(1, 2, 0)  # [N, h, F]
    term_bd = torch.matmul(q_blocks, s).reshape(n, u, w, span)
    term_bd = nn.functional.pad(term_bd, (0, c + 1 - span)).reshape(n, u, w * (c + 1))
    term_bd = term_bd[..., : w * c].reshape(n, u, w, c)
    cap = spec.logit_cap
    logits = torch.tanh((term_ac + term_bd) / cap) * cap + mask  # mask [1, U, W, C]
    out = torch.matmul(torch.softmax(logits, dim=-1), v_ctx)  # [N, U, W, h]
    return out.reshape(n, u * w, h).permute(1, 0, 2)[: attn.steps].unsqueeze(0)  # [1, T, N, h]


def _block(block: ConformerBlock, x: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ConformerBlock.forward with the float mask."""
    x = block.ffw_layer_start(x)
    a = block.attention
    h = _attention(a.attn, a.pre_attn_norm(torch.clamp(x, -a.clip, a.clip)), mask)
    h = torch.clamp(a.post(h.reshape(1, h.shape[1], -1)), -a.clip, a.clip)
    x = x + a.post_norm(h)
    x = block.lconv1d(x * valid.unsqueeze(-1))
    return block.norm(torch.clamp(block.ffw_layer_end(x), -block.clip, block.clip))


def _every(mask: torch.Tensor, stride: int, steps: int) -> torch.Tensor:
    """AudioTower's mask_index gather, clamp(arange(steps) * stride, max=F-1), as a strided Slice
    (and repeats of the last frame where the clamp bites)."""
    picked = mask[:, ::stride][:, :steps]
    short = steps - picked.shape[1]
    return torch.cat([picked, mask[:, -1:].expand(1, short)], dim=1) if short > 0 else picked


class NpuAudioEncoder(nn.Module):
    """(features [1,F,128], mask [1,F] float32) -> soft embeddings [1, soft_tokens, H]."""

    def __init__(self, encoder: AudioEncoder):
        super().__init__()
        self.encoder = with_fused_rms_norms(encoder, encoder.spec.text_hidden_size)
        sscp = encoder.tower.subsample_conv_projection
        self.norm_0 = NpuCumulativeGroupNorm(sscp.conv_0.norm)
        self.norm_1 = NpuCumulativeGroupNorm(sscp.conv_1.norm)
        with torch.no_grad():  # the padding embedding, a constant of the graph
            self.register_buffer("pad", encoder.embedder.hard_last(), persistent=False)

    @property
    def spec(self):
        return self.encoder.spec

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tower, embedder = self.encoder.tower, self.encoder.embedder
        sscp = tower.subsample_conv_projection
        x = _sscp_block(sscp.conv_1, self.norm_1, _sscp_block(sscp.conv_0, self.norm_0, features.unsqueeze(1)))
        _, c, t, f = x.shape
        x = sscp.input_proj_linear(x.permute(0, 2, 3, 1).reshape(1, t, f * c))
        valid = _every(mask, self.spec.time_stride, x.shape[1])  # [1, T] float
        attn_mask = attention_mask(tower.conformer[0].attention.attn, valid)
        for block in tower.conformer:
            x = _block(block, x, valid, attn_mask)
        r = self.spec.reduction_factor
        x, valid = x[:, ::r], valid[:, ::r].unsqueeze(-1)  # [1, S, D], [1, S, 1]
        soft = embedder.soft(x * valid)
        pad = self.pad
        soft = soft * valid + pad * (1.0 - valid)
        extra = self.spec.soft_tokens - soft.shape[1]
        return torch.cat([soft, pad.expand(1, extra, -1)], dim=1) if extra > 0 else soft
