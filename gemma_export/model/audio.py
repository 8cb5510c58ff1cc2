"""The audio encoder graph's model: USM conformer + the multimodal embedder's soft path, static shapes.

    features [1,F,128] float32 (log-mel, F = 2997 for 30 s), mask [1,F] bool (True = real frame)
      -> SubSampleConvProjection: 2 x (pad, Conv2d 3x3 stride 2, cumulative group norm, ReLU),
         flatten channels x freq, Linear                               -> [1, T, D]   T = 750
      -> mask[:, ::4] (the eager gather of arange(T) * 4, as a static slice)
      -> conformer blocks: FFW/2, chunked local self-attention (chunk 12, 12 back, relative
         positions, logit soft-cap), light conv (GLU, causal depthwise conv), FFW/2, RMS norm
      -> every 4th step, padded steps zeroed                          -> [1, 188, D]
      -> embedder soft path: RMS norm (scale), Linear D -> H, RMS norm (no scale)
      -> padded steps replaced by the embedding of the last audio-vocabulary id (hard path),
         and rows appended up to `soft_tokens` if the encoder gives fewer  -> [1, 188, H]

Everything data-dependent in the eager model becomes static index arithmetic fixed at build time:
`unfold` of the key/value context is a Gather with a constant [U*C] index, the mask gathers are
strided slices, the cumulative norm's element counts are a constant, and the block padding sizes
are Python ints. Parameter names mirror transformers' (`tower.*` = `model.audio_tower.*`,
`embedder.*` = `model.embed_audio.*`), so the weights load with a one-line name map, strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ExportError
from .layers import RMSNorm


class AudioConfigError(ExportError):
    """The checkpoint's audio config is missing or names something this exporter does not build."""


@dataclass(frozen=True)
class AudioSpec:
    """What the audio graph needs from a Gemma3nForConditionalGeneration config."""

    text_hidden_size: int
    hidden_size: int = 1536
    num_layers: int = 12
    num_heads: int = 8
    input_feat_size: int = 128
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    chunk_size: int = 12
    context_left: int = 13
    context_right: int = 0
    logit_cap: float = 50.0
    conv_kernel_size: int = 5
    reduction_factor: int = 4
    residual_weight: float = 0.5
    sscp_channels: tuple[int, int] = (128, 32)
    sscp_kernels: tuple[tuple[int, int], tuple[int, int]] = ((3, 3), (3, 3))
    sscp_strides: tuple[tuple[int, int], tuple[int, int]] = ((2, 2), (2, 2))
    sscp_eps: float = 1e-3
    vocab_size: int = 128
    soft_tokens: int = 188  # audio_soft_tokens_per_image
    num_frames: int = 2997  # 480,000 samples: (480000 - 513) // 160 + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_past(self) -> int:
        return max(0, self.context_left - 1)

    @property
    def context_size(self) -> int:
        return self.chunk_size + self.max_past + self.context_right

    def sscp_dims(self) -> list[tuple[int, int]]:
        """(time, freq) after each sub-sampling conv (time padded by kernel-1 below, freq by 1 each side)."""
        t, f, dims = self.num_frames, self.input_feat_size, []
        for (kt, kf), (st, sf) in zip(self.sscp_kernels, self.sscp_strides):
            t = (t + kt - 1 - kt) // st + 1
            f = (f + 2 - kf) // sf + 1
            dims.append((t, f))
        return dims

    @property
    def encoder_steps(self) -> int:
        return self.sscp_dims()[-1][0]  # 750

    @property
    def time_stride(self) -> int:
        return math.prod(s[0] for s in self.sscp_strides)

    @property
    def output_steps(self) -> int:
        return -(-self.encoder_steps // self.reduction_factor)  # 188

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.num_frames, self.input_feat_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (1, self.soft_tokens, self.text_hidden_size)


def audio_spec_from_config(config: dict[str, Any], num_frames: int = 2997) -> AudioSpec:
    """The spec from the checkpoint's config.json (Hugging Face layout)."""
    if "audio_config" not in config or "text_config" not in config:
        raise AudioConfigError("config.json has no audio_config/text_config: not a multimodal Gemma 3n checkpoint")
    a, text = config["audio_config"], config["text_config"]
    d = AudioSpec(text_hidden_size=int(text["hidden_size"]))
    spec = AudioSpec(
        text_hidden_size=int(text["hidden_size"]),
        hidden_size=int(a.get("hidden_size", d.hidden_size)),
        num_layers=int(a.get("conf_num_hidden_layers", d.num_layers)),
        num_heads=int(a.get("conf_num_attention_heads", d.num_heads)),
        input_feat_size=int(a.get("input_feat_size", d.input_feat_size)),
        rms_norm_eps=float(a.get("rms_norm_eps", d.rms_norm_eps)),
        gradient_clipping=float(a.get("gradient_clipping", d.gradient_clipping)),
        chunk_size=int(a.get("conf_attention_chunk_size", d.chunk_size)),
        context_left=int(a.get("conf_attention_context_left", d.context_left)),
        context_right=int(a.get("conf_attention_context_right", d.context_right)),
        logit_cap=float(a.get("conf_attention_logit_cap", d.logit_cap)),
        conv_kernel_size=int(a.get("conf_conv_kernel_size", d.conv_kernel_size)),
        reduction_factor=int(a.get("conf_reduction_factor", d.reduction_factor)),
        residual_weight=float(a.get("conf_residual_weight", d.residual_weight)),
        sscp_channels=tuple(int(c) for c in a.get("sscp_conv_channel_size", d.sscp_channels)),
        sscp_kernels=tuple(tuple(int(k) for k in ks) for ks in a.get("sscp_conv_kernel_size", d.sscp_kernels)),
        sscp_strides=tuple(tuple(int(s) for s in ss) for ss in a.get("sscp_conv_stride_size", d.sscp_strides)),
        sscp_eps=float(a.get("sscp_conv_group_norm_eps", d.sscp_eps)),
        vocab_size=int(a.get("vocab_size", d.vocab_size)),
        soft_tokens=int(config.get("audio_soft_tokens_per_image", d.soft_tokens)),
        num_frames=num_frames,
    )
    if len(spec.sscp_channels) != 2 or len(spec.sscp_kernels) != 2 or len(spec.sscp_strides) != 2:
        raise AudioConfigError("the sub-sampling projection must have exactly 2 conv layers")
    if spec.hidden_size % spec.num_heads:
        raise AudioConfigError(f"audio hidden_size {spec.hidden_size} is not a multiple of {spec.num_heads} heads")
    if spec.output_steps > spec.soft_tokens:
        raise AudioConfigError(f"{spec.num_frames} frames give {spec.output_steps} audio tokens, more than "
                               f"the {spec.soft_tokens} placeholders the processor writes")
    vocab_offset, text_vocab = int(a.get("vocab_offset", 262_272)), int(text.get("vocab_size", 262_400))
    if vocab_offset + spec.vocab_size != text_vocab:
        raise AudioConfigError(f"the audio vocabulary [{vocab_offset}, {vocab_offset + spec.vocab_size}) does not "
                               f"end at the text vocab_size {text_vocab}: the padding id would not be an audio id")
    return spec


# ---- sub-sampling projection ------------------------------------------------------------------


class CumulativeGroupNorm(nn.Module):
    """Group norm (1 group) with statistics accumulated over time; x [1, T, F, C].

    The eager module counts elements with a ones tensor and cumsum; the count at step t is
    (t + 1) * F * C, a constant here.
    """

    def __init__(self, channels: int, time: int, freq: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        count = torch.arange(1, time + 1, dtype=torch.float32) * float(freq * channels)
        self.register_buffer("count", count.view(1, time, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.cumsum(x.sum(dim=(2, 3), keepdim=True), dim=1) / self.count
        var = torch.cumsum((x - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / self.count
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight


class SSCPConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel, stride, out_dims: tuple[int, int], eps: float):
        super().__init__()
        self.padding = (1, 1, 0, kernel[0] - 1)  # freq left/right, time top/bottom
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=tuple(kernel), stride=tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(out_ch, out_dims[0], out_dims[1], eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [1, C, T, F]
        x = self.conv(F.pad(x, self.padding))
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.relu(x)


class SubSampleConvProjection(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        dims = spec.sscp_dims()
        c0, c1 = spec.sscp_channels
        self.conv_0 = SSCPConvBlock(1, c0, spec.sscp_kernels[0], spec.sscp_strides[0], dims[0], spec.sscp_eps)
        self.conv_1 = SSCPConvBlock(c0, c1, spec.sscp_kernels[1], spec.sscp_strides[1], dims[1], spec.sscp_eps)
        self.input_proj_linear = nn.Linear(c1 * dims[1][1], spec.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [1, F, 128] -> [1, T, D]
        x = self.conv_1(self.conv_0(features.unsqueeze(1)))  # [1, C, T, f]
        _, c, t, f = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(1, t, f * c))


# ---- conformer --------------------------------------------------------------------------------


class RelativePositionEmbedding(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.pos_proj = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        num_timescales = spec.hidden_size // 2
        increment = math.log(1.0e4) / max(num_timescales - 1, 1)
        inv_timescales = torch.exp(torch.arange(num_timescales) * -increment).float()
        positions = torch.arange(spec.max_past, -spec.context_right - 1, -1).float().unsqueeze(-1)
        scaled = positions * inv_timescales.view(1, -1)
        self.register_buffer("timing", torch.cat([torch.sin(scaled), torch.cos(scaled)], -1), persistent=False)


class ChunkedLocalAttention(nn.Module):
    """Gemma3nAudioAttention with every block/context index fixed for T steps.

    q [1,T,N,h] -> blocks [1,U,W,N,h] (zero-padded to U*W);  k, v -> context [1,U,C,N,h] by a
    constant Gather over the zero-padded sequence (pad `max_past` before, `right + W - 1` after);
    logits = q.k + relative term (q . pos_proj(sinusoid) shifted by pad/reshape), soft-capped,
    masked by (context key is real) & (local causal window), softmax, . v.
    """

    def __init__(self, spec: AudioSpec, steps: int):
        super().__init__()
        self.spec = spec
        n, h, w, c = spec.num_heads, spec.head_dim, spec.chunk_size, spec.context_size
        self.steps, self.blocks = steps, -(-steps // w)
        self.relative_position_embedding = RelativePositionEmbedding(spec)
        self.per_dim_scale = nn.Parameter(torch.zeros(h))
        self.q_proj = nn.Linear(spec.hidden_size, n * h, bias=False)
        self.k_proj = nn.Linear(spec.hidden_size, n * h, bias=False)
        self.v_proj = nn.Linear(spec.hidden_size, n * h, bias=False)
        q_scale = torch.tensor(h**-0.5) * (1.0 / F.softplus(torch.tensor(0.0)))
        self.register_buffer("q_scale", q_scale, persistent=False)
        lower = torch.tril(torch.ones((c, w), dtype=torch.bool)).T
        upper = torch.tril(torch.ones((w, c), dtype=torch.bool), diagonal=spec.max_past + spec.context_right)
        self.register_buffer("causal", lower & upper, persistent=False)  # [W, C]
        index = torch.arange(self.blocks)[:, None] * w + torch.arange(c)[None, :]  # unfold(size C, step W)
        self.register_buffer("context_index", index.reshape(-1), persistent=False)
        self.pad_context = (spec.max_past, spec.context_right + w - 1)

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [1, U, C, ...]: zero-pad the time axis and gather each block's window."""
        pad = [0, 0] * (x.dim() - 2) + list(self.pad_context)
        x = F.pad(x, pad)
        return x.index_select(1, self.context_index).reshape(1, self.blocks, self.spec.context_size, *x.shape[2:])

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        spec, u = self.spec, self.blocks
        n, h, w, c = spec.num_heads, spec.head_dim, spec.chunk_size, spec.context_size
        q = self.q_proj(x).reshape(1, self.steps, n, h)
        k = self.k_proj(x).reshape(1, self.steps, n, h)
        v = self.v_proj(x).reshape(1, self.steps, n, h)
        q = q * self.q_scale * F.softplus(self.per_dim_scale).view(1, 1, 1, h)
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, u * w - self.steps)).reshape(1, u, w, n, h)
        k_blocks, v_blocks = self._context(k), self._context(v)  # [1, U, C, N, h]
        valid_blocks = self._context(valid.to(torch.float32)) > 0.5  # [1, U, C]

        sin_emb = self.relative_position_embedding.pos_proj(self.relative_position_embedding.timing)
        span = sin_emb.shape[0]
        q_p = q_blocks.permute(0, 3, 1, 2, 4)  # [1, N, U, W, h]
        term_ac = torch.matmul(q_p, k_blocks.permute(0, 3, 1, 4, 2))  # [1, N, U, W, C]
        s = sin_emb.reshape(span, n, h).permute(1, 2, 0)  # [N, h, F]
        term_bd = torch.matmul(q_p.reshape(1, n, u * w, h), s).reshape(1, n, u, w, span)
        term_bd = F.pad(term_bd, (0, c + 1 - span)).reshape(1, n, u, w * (c + 1))
        term_bd = term_bd[..., : w * c].reshape(1, n, u, w, c)
        logits = term_ac + term_bd

        cap = spec.logit_cap
        logits = torch.tanh(logits / cap) * cap
        allowed = valid_blocks.unsqueeze(1).unsqueeze(-2) & self.causal  # [1, 1, U, W, C] & [W, C]
        logits = torch.where(allowed, logits, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs, v_blocks.permute(0, 3, 1, 2, 4))  # [1, N, U, W, h]
        out = out.permute(0, 2, 3, 1, 4).reshape(1, u * w, n, h)
        return out[:, : self.steps]


class ConformerAttention(nn.Module):
    def __init__(self, spec: AudioSpec, steps: int):
        super().__init__()
        self.clip = spec.gradient_clipping
        self.pre_attn_norm = RMSNorm(spec.hidden_size, 1e-6)
        self.attn = ChunkedLocalAttention(spec, steps)
        self.post = nn.Linear(spec.hidden_size, spec.hidden_size, bias=False)
        self.post_norm = RMSNorm(spec.hidden_size, 1e-6)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.pre_attn_norm(torch.clamp(x, -self.clip, self.clip)), valid)
        h = torch.clamp(self.post(h.reshape(1, h.shape[1], -1)), -self.clip, self.clip)
        return x + self.post_norm(h)


class ConformerFeedForward(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.clip, self.scale = spec.gradient_clipping, spec.residual_weight
        self.pre_layer_norm = RMSNorm(spec.hidden_size, 1e-6)
        self.ffw_layer_1 = nn.Linear(spec.hidden_size, spec.hidden_size * 4, bias=False)
        self.ffw_layer_2 = nn.Linear(spec.hidden_size * 4, spec.hidden_size, bias=False)
        self.post_layer_norm = RMSNorm(spec.hidden_size, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_layer_norm(torch.clamp(x, -self.clip, self.clip))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        return x + self.post_layer_norm(torch.clamp(h, -self.clip, self.clip)) * self.scale


class ConformerLightConv1d(nn.Module):
    def __init__(self, spec: AudioSpec):
        super().__init__()
        d, self.clip = spec.hidden_size, spec.gradient_clipping
        self.pre_layer_norm = RMSNorm(d, spec.rms_norm_eps)
        self.linear_start = nn.Linear(d, d * 2, bias=False)
        self.depthwise_conv1d = nn.Conv1d(d, d, kernel_size=spec.conv_kernel_size, groups=d, bias=False)
        self.conv_norm = RMSNorm(d, spec.rms_norm_eps)
        self.linear_end = nn.Linear(d, d, bias=False)
        self.causal_padding = spec.conv_kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)
        h = self.depthwise_conv1d(F.pad(h.permute(0, 2, 1), (self.causal_padding, 0))).permute(0, 2, 1)
        h = F.silu(self.conv_norm(torch.clamp(h, -self.clip, self.clip)))
        return self.linear_end(h) + x


class ConformerBlock(nn.Module):
    def __init__(self, spec: AudioSpec, steps: int):
        super().__init__()
        self.clip = spec.gradient_clipping
        self.ffw_layer_start = ConformerFeedForward(spec)
        self.attention = ConformerAttention(spec, steps)
        self.lconv1d = ConformerLightConv1d(spec)
        self.ffw_layer_end = ConformerFeedForward(spec)
        self.norm = RMSNorm(spec.hidden_size, 1e-6)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.ffw_layer_start(x), valid)
        x = self.lconv1d(x * valid.unsqueeze(-1).to(x.dtype))
        return self.norm(torch.clamp(self.ffw_layer_end(x), -self.clip, self.clip))


class AudioTower(nn.Module):
    """Gemma3nAudioEncoder for a fixed number of frames: (features, valid) -> ([1, T/4, D], valid)."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.spec = spec
        steps = spec.encoder_steps
        self.subsample_conv_projection = SubSampleConvProjection(spec)
        self.conformer = nn.ModuleList([ConformerBlock(spec, steps) for _ in range(spec.num_layers)])
        # eager: gather(mask, clamp(arange(T) * stride, max=F-1))
        index = torch.clamp(torch.arange(steps) * spec.time_stride, max=spec.num_frames - 1)
        self.register_buffer("mask_index", index, persistent=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.subsample_conv_projection(features)
        valid = mask.index_select(1, self.mask_index)  # [1, T] True = real
        for block in self.conformer:
            x = block(x, valid)
        r = self.spec.reduction_factor
        x, valid = x[:, ::r], valid[:, ::r]
        return x * valid.unsqueeze(-1).to(x.dtype), valid


class MultimodalEmbedder(nn.Module):
    """Gemma3nMultimodalEmbedder: soft path for encoder outputs, hard path for one padding id."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        eps = spec.rms_norm_eps
        self.embedding = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.hard_embedding_norm = RMSNorm(spec.hidden_size, eps)
        self.soft_embedding_norm = RMSNorm(spec.hidden_size, eps)
        self.embedding_projection = nn.Linear(spec.hidden_size, spec.text_hidden_size, bias=False)
        self.embedding_post_projection_norm = RMSNorm(spec.text_hidden_size, eps, with_scale=False)

    def soft(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(self.soft_embedding_norm(x)))

    def hard_last(self) -> torch.Tensor:
        """[1, 1, H]: the embedding of the last audio-vocabulary id (the eager model's padding)."""
        row = self.embedding.weight[-1:].unsqueeze(0)
        return self.embedding_post_projection_norm(self.embedding_projection(self.hard_embedding_norm(row)))


class AudioEncoder(nn.Module):
    """features [1,F,128] float32 + mask [1,F] bool (True = real frame) -> soft embeddings [1,188,H]."""

    def __init__(self, spec: AudioSpec):
        super().__init__()
        self.spec = spec
        self.tower = AudioTower(spec)
        self.embedder = MultimodalEmbedder(spec)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        encodings, valid = self.tower(features, mask)
        soft = self.embedder.soft(encodings)
        pad = self.embedder.hard_last()
        soft = torch.where(valid.unsqueeze(-1), soft, pad)
        extra = self.spec.soft_tokens - soft.shape[1]
        return torch.cat([soft, pad.expand(1, extra, -1)], dim=1) if extra > 0 else soft


# ---- weights ----------------------------------------------------------------------------------

WEIGHT_PREFIXES = {"model.audio_tower.": "tower.", "model.embed_audio.": "embedder."}


def audio_weight_map(model: AudioEncoder, checkpoint_names: list[str]) -> dict[str, str]:
    """checkpoint name -> parameter name, for every `model.audio_tower.*` / `model.embed_audio.*`
    weight; a weight without a parameter, or a parameter without a weight, is an error."""
    params = dict(model.named_parameters())
    mapping: dict[str, str] = {}
    for name in checkpoint_names:
        for prefix, dest in WEIGHT_PREFIXES.items():
            if name.startswith(prefix):
                target = dest + name[len(prefix):]
                if target not in params:
                    raise AudioConfigError(f"checkpoint weight {name} has no place in the audio encoder")
                mapping[name] = target
    missing = sorted(set(params) - set(mapping.values()))
    if missing:
        raise AudioConfigError(f"the checkpoint lacks audio weights: {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    return mapping


def load_audio_encoder(spec: AudioSpec, tensors) -> AudioEncoder:
    """Build the encoder and fill it from a TensorSource (names(), shape(), get()), strictly."""
    model = AudioEncoder(spec).eval()
    params = dict(model.named_parameters())
    for name, target in audio_weight_map(model, tensors.names()).items():
        value = tensors.get(name)
        if tuple(value.shape) != tuple(params[target].shape):
            raise AudioConfigError(f"{name}: shape {tuple(value.shape)}, "
                                   f"the encoder expects {tuple(params[target].shape)}")
        with torch.no_grad():
            params[target].copy_(value.to(torch.float32))
    return model
