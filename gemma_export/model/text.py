"""The export-friendly Gemma text decoder (Gemma, Gemma 3, Gemma 3n) under DESIGN.md's contract.

    inputs_embeds [1,T,H]        host rows, already * sqrt(H)
    per_layer_inputs [1,T,L,P]   Gemma 3n only: host rows, already * sqrt(P)
    position [1], valid [1]      first absolute position of the chunk, count of real tokens
    past_key.N / past_value.N    [1,KV,S,d] for each layer N that owns a cache
      -> logits [1,V] (last valid position), new_key.N / new_value.N [1,KV,T,d]

Parameter names follow the Hugging Face text model's (`layers.3.self_attn.q_proj.weight`), so the
weight map is a prefix and a few declared exceptions (see weights.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..variants import SLIDING, Variant
from .gqa import GqaInputs, group_query_attention, layer_windowed_rows
from .layers import (
    SQRT2_INV,
    RMSNorm,
    activation,
    apply_rope,
    attention_masks,
    gaussian_topk_multiplier,
    linear,
    rope_tables,
    two_block_attention,
)


class Attention(nn.Module):
    def __init__(self, variant: Variant, layer: int):
        super().__init__()
        v, d = variant, variant.head_dim
        self.variant = variant
        self.layer = layer
        self.owns_kv = variant.kv_source(layer) == layer
        self.q_proj = linear(v.hidden_size, v.num_heads * d)
        self.o_proj = linear(v.num_heads * d, v.hidden_size)
        if self.owns_kv:
            self.k_proj = linear(v.hidden_size, v.num_kv_heads * d)
            self.v_proj = linear(v.hidden_size, v.num_kv_heads * d)
        if v.qk_norm:
            self.q_norm = RMSNorm(d, v.rms_norm_eps)
            if self.owns_kv:
                self.k_norm = RMSNorm(d, v.rms_norm_eps)
        # Gemma 3n normalizes values too, without a scale
        self.v_norm = RMSNorm(d, v.rms_norm_eps, with_scale=False) if v.gemma3n and self.owns_kv else None

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(1, x.shape[1], heads, self.variant.head_dim)

    def new_kv(self, x: torch.Tensor, cos, sin):
        """This chunk's keys and values [1,KV,T,d], roped and normed: what the cache stores."""
        k = self._heads(self.k_proj(x), self.variant.num_kv_heads)
        v = self._heads(self.v_proj(x), self.variant.num_kv_heads)
        if self.variant.qk_norm:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        return apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def forward(self, x, cos, sin, past, shared_new, masks):
        """past: (k_past, v_past) of this layer's cache or of its KV producer's.
        shared_new: the producer's new rows for a KV-shared layer, else None.
        masks: the two-block masks, or GqaInputs for the fused op (model/gqa.py).
        Returns (output, (k_new, v_new)), or with GqaInputs (output, (present_key, present_value))."""
        if isinstance(masks, GqaInputs):
            return self._fused(x, past, shared_new, masks)
        q = self._heads(self.q_proj(x), self.variant.num_heads)
        if self.variant.qk_norm:
            q = self.q_norm(q)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        new = self.new_kv(x, cos, sin) if self.owns_kv else shared_new
        out = two_block_attention(q, *past, *new, *masks, self.variant.attn_scale, self.variant.attn_logit_softcap)
        return self.o_proj(out.transpose(1, 2).reshape(1, x.shape[1], -1)), new

    def _fused(self, x, past, shared_new, gqa: GqaInputs):
        """GroupQueryAttention: normed, not yet roped q/k in [1,T,heads*d]; the op ropes them and
        writes k/v into the cache buffer it returns as present. A KV-shared layer (Gemma 3n) gets
        its producer's present as `past` and the producer's op inputs as `shared_new`: its op writes
        the same rows into the same buffer again (the runtime binds both presents to one buffer,
        manifest CacheSpec.readers), so it reads the producer's cache in place.
        Returns (output, (present_key, present_value, key, value)): key/value are the op's inputs."""
        v, chunk = self.variant, x.shape[1]

        def normed(y, norm, heads):  # a per-head norm on [1, T, heads, D], back to the op's [1, T, heads * D]
            return norm(self._heads(y, heads)).reshape(1, chunk, -1)

        # only a normed projection is reshaped: a Reshape to its own shape is still a node a step
        q = self.q_proj(x)
        if v.qk_norm:
            q = normed(q, self.q_norm, v.num_heads)
        if self.owns_kv:
            k, value = self.k_proj(x), self.v_proj(x)
            if v.qk_norm:
                k = normed(k, self.k_norm, v.num_kv_heads)
            if self.v_norm is not None:
                value = normed(value, self.v_norm, v.num_kv_heads)
        else:
            k, value = shared_new
        out, present_key, present_value = group_query_attention(
            q, k, value, *past, gqa.seqlens_k, gqa.total,
            gqa.cos, gqa.sin, v.num_heads, v.num_kv_heads, v.attn_scale, gqa.window, int(gqa.windowed))
        return self.o_proj(out), (present_key, present_value, k, value)


class MLP(nn.Module):
    """GeGLU; Gemma 3n layers with activation sparsity keep only the gate values above
    mean + std * icdf(sparsity) (gaussian top-k), the multiplier precomputed."""

    def __init__(self, variant: Variant, layer: int):
        super().__init__()
        size = variant.intermediate_sizes[layer]
        self.gate_proj = linear(variant.hidden_size, size)
        self.up_proj = linear(variant.hidden_size, size)
        self.down_proj = linear(size, variant.hidden_size)
        self.act = activation(variant.activation)
        sparsity = variant.gemma3n.activation_sparsity[layer] if variant.gemma3n else 0.0
        self.std_multiplier = gaussian_topk_multiplier(sparsity) if sparsity > 0 else None

    def forward(self, x):
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            mean = gate.mean(-1, keepdim=True)
            std = (gate - mean).pow(2).mean(-1, keepdim=True).sqrt()
            gate = torch.relu(gate - (mean + std * self.std_multiplier))
        return self.down_proj(self.act(gate) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Gemma (pre-norm) and Gemma 3 (pre- and post-norm around attention and MLP)."""

    def __init__(self, variant: Variant, layer: int):
        super().__init__()
        h, eps = variant.hidden_size, variant.rms_norm_eps
        self.self_attn = Attention(variant, layer)
        self.mlp = MLP(variant, layer)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.sandwich = variant.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(h, eps)
            self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x, cos, sin, past, shared_new, masks, per_layer_input=None):
        attn, new = self.self_attn(self.input_layernorm(x), cos, sin, past, shared_new, masks)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x)), new
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), new


class AltUp(nn.Module):
    """Gemma 3n's alternating updates: A parallel streams, one (active) goes through the layer,
    the others are predicted before it and corrected after it."""

    def __init__(self, variant: Variant):
        super().__init__()
        n, h = variant.gemma3n.altup_num_inputs, variant.hidden_size
        self.active = variant.gemma3n.altup_active_idx
        self.n = n
        self.correct_output_scale = nn.Parameter(torch.zeros(h))
        self.correction_coefs = linear(n, n)
        self.prediction_coefs = linear(n, n * n)
        self.modality_router = linear(h, n)
        self.router_norm = RMSNorm(h, variant.rms_norm_eps)
        self.router_input_scale = 1.0 / h

    def _modalities(self, x):
        return torch.tanh(self.modality_router(self.router_norm(x) * self.router_input_scale))

    def predict(self, streams):
        """streams [A,1,T,H] -> predictions [A,1,T,H]"""
        coefs = self.prediction_coefs(self._modalities(streams[self.active]))  # [1,T,A*A]
        coefs = coefs.reshape(1, -1, self.n, self.n).permute(0, 1, 3, 2)  # [1,T,A(in),A(out)]
        mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs)  # [1,T,H,A]
        return mixed.permute(3, 0, 1, 2) + streams

    def correct(self, predictions, activated):
        coefs = self.correction_coefs(self._modalities(activated)) + 1.0  # [1,T,A]
        innovation = activated - predictions[self.active]  # [1,T,H]
        return innovation.unsqueeze(0) * coefs.permute(2, 0, 1).unsqueeze(-1) + predictions


class LaurelBlock(nn.Module):
    def __init__(self, variant: Variant):
        super().__init__()
        self.linear_left = linear(variant.hidden_size, variant.gemma3n.laurel_rank)
        self.linear_right = linear(variant.gemma3n.laurel_rank, variant.hidden_size)
        self.post_laurel_norm = RMSNorm(variant.hidden_size, variant.rms_norm_eps)

    def forward(self, x):
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nDecoderLayer(nn.Module):
    def __init__(self, variant: Variant, layer: int):
        super().__init__()
        h, eps, p = variant.hidden_size, variant.rms_norm_eps, variant.gemma3n.per_layer_dim
        self.variant = variant
        self.self_attn = Attention(variant, layer)
        self.mlp = MLP(variant, layer)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.altup = AltUp(variant)
        self.laurel = LaurelBlock(variant)
        self.per_layer_input_gate = linear(h, p)
        self.per_layer_projection = linear(p, h)
        self.post_per_layer_input_norm = RMSNorm(h, eps)
        self.act = activation(variant.activation)

    def forward(self, streams, cos, sin, past, shared_new, masks, per_layer_input=None):
        active_idx = self.altup.active
        predictions = self.altup.predict(streams)
        active = predictions[active_idx]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        attn, new = self.self_attn(normed, cos, sin, past, shared_new, masks)
        attn = self.post_attention_layernorm(attn)
        x = (active + attn + laurel) * SQRT2_INV
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, x)

        first = corrected[active_idx]
        if self.variant.gemma3n.altup_correct_scale:
            first = first * self.altup.correct_output_scale
        first = self.act(self.per_layer_input_gate(first)) * per_layer_input
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        # every stream after the first receives the per-layer signal (as in the reference)
        return torch.cat((corrected[:1], corrected[1:] + first), dim=0), new


TWO_BLOCK, GROUP_QUERY = "two-block", "group-query"
ATTENTIONS = (TWO_BLOCK, GROUP_QUERY)


class TextDecoder(nn.Module):
    """The whole decoder as one graph; `forward` is what torch.onnx.export traces."""

    def __init__(self, variant: Variant, max_context: int, attention: str = TWO_BLOCK):
        super().__init__()
        v = variant
        self.variant = variant
        self.max_context = max_context
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention
        if attention == GROUP_QUERY:
            # the op's rotary tables, one pair per layer kind, for every position of the context;
            # real tensors even when the model is built on the meta device (they are constants)
            with torch.device("cpu"):
                positions = torch.arange(max_context, dtype=torch.float32)
                for t in sorted(set(v.layer_types)):
                    cos, sin = rope_tables(v, t, positions)
                    self.register_buffer(f"rope_cos_{t}", cos[:, : v.head_dim // 2].contiguous(), persistent=False)
                    self.register_buffer(f"rope_sin_{t}", sin[:, : v.head_dim // 2].contiguous(), persistent=False)
        layer_cls = Gemma3nDecoderLayer if v.gemma3n else DecoderLayer
        self.layers = nn.ModuleList(layer_cls(v, i) for i in range(v.num_layers))
        self.norm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        # The LM head is its own [H, V] weight (tied checkpoints: the token table transposed once at
        # load), so the graph is a single MatMul with no runtime Transpose.
        self.lm_head_t = nn.Parameter(torch.zeros(v.hidden_size, v.vocab_size))
        if v.gemma3n:
            g, L = v.gemma3n, v.num_layers
            self.per_layer_model_projection = linear(v.hidden_size, L * g.per_layer_dim)
            self.per_layer_projection_norm = RMSNorm(g.per_layer_dim, v.rms_norm_eps)
            self.altup_projections = nn.ModuleList(
                linear(v.hidden_size, v.hidden_size) for _ in range(g.altup_num_inputs - 1)
            )
            self.altup_unembed_projections = nn.ModuleList(
                linear(v.hidden_size, v.hidden_size) for _ in range(g.altup_num_inputs - 1)
            )

    # -- Gemma 3n helpers -------------------------------------------------------------------
    def _per_layer_inputs(self, embeds, host_rows):
        """(projection of inputs_embeds, normed) + host rows, / sqrt(2): [1,T,L,P]."""
        g = self.variant.gemma3n
        proj = self.per_layer_model_projection(embeds) * (self.variant.hidden_size**-0.5)
        proj = self.per_layer_projection_norm(proj.reshape(1, embeds.shape[1], self.variant.num_layers, g.per_layer_dim))
        return (proj + host_rows) * SQRT2_INV

    @staticmethod
    def _rescaled(x, target_magnitude):
        magnitude = torch.sqrt(torch.clamp(x.pow(2).mean(-1, keepdim=True), min=1e-5))
        return x * target_magnitude / magnitude

    def _altup_streams(self, embeds):
        target = embeds.pow(2).mean(-1, keepdim=True).sqrt()
        extra = [self._rescaled(proj(embeds), target) for proj in self.altup_projections]
        return torch.stack([embeds, *extra], dim=0)

    def _altup_merge(self, streams):
        target = streams[0].pow(2).mean(-1, keepdim=True).sqrt()
        extra = [self._rescaled(proj(streams[i + 1]), target) for i, proj in enumerate(self.altup_unembed_projections)]
        return torch.stack([streams[0], *extra], dim=0).mean(0)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, inputs_embeds, per_layer_inputs, position, valid, past: list[torch.Tensor]):
        """past: [past_key, past_value] for each layer in variant.cache_layers, in that order.
        Returns (logits, [new_key, new_value] per cache layer)."""
        v = self.variant
        chunk = inputs_embeds.shape[1]
        if self.attention == GROUP_QUERY:
            return self._forward_fused(inputs_embeds, per_layer_inputs, position, valid, past)
        positions = (position + torch.arange(chunk, dtype=torch.int64)).to(torch.float32)
        rope = {t: rope_tables(v, t, positions) for t in set(v.layer_types)}
        cache_layers = v.cache_layers
        past_of = {layer: (past[2 * i], past[2 * i + 1]) for i, layer in enumerate(cache_layers)}
        masks = {}
        for layer in cache_layers:
            key = (v.layer_types[layer], past_of[layer][0].shape[2])
            if key not in masks:
                masks[key] = attention_masks(v, key[0], key[1], position, chunk)

        if v.gemma3n:
            per_layer = self._per_layer_inputs(inputs_embeds, per_layer_inputs)
            hidden = self._altup_streams(inputs_embeds)
        else:
            hidden = inputs_embeds

        new_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            cos, sin = rope[v.layer_types[i]]
            source = v.kv_source(i)
            past_kv = past_of[source]
            layer_masks = masks[(v.layer_types[source], past_kv[0].shape[2])]
            hidden, new = layer(
                hidden, cos, sin, past_kv, new_rows.get(source), layer_masks,
                per_layer[:, :, i, :] if v.gemma3n else None,
            )
            new_rows.setdefault(source, new)

        return self._logits(hidden, valid), [t for layer in cache_layers for t in new_rows[layer]]

    def _forward_fused(self, inputs_embeds, per_layer_inputs, position, valid, past):
        """GroupQueryAttention graph: returns (logits, [present_key, present_value] per cache layer,
        then per KV-shared layer)."""
        v = self.variant
        chunk = inputs_embeds.shape[1]
        last_row = (position + chunk - 1).to(torch.int32)
        total = last_row.reshape(()) + 1
        windows = {t: v.sliding_window if t == SLIDING and v.sliding_window else -1 for t in set(v.layer_types)}
        kinds = {
            (t, windowed): GqaInputs(last_row, total, getattr(self, f"rope_cos_{t}"), getattr(self, f"rope_sin_{t}"),
                                     window, windowed)
            for t, window in windows.items() for windowed in (False, True)
        }
        cache_layers = v.cache_layers
        past_of = {layer: (past[2 * i], past[2 * i + 1]) for i, layer in enumerate(cache_layers)}
        if v.gemma3n:
            per_layer = self._per_layer_inputs(inputs_embeds, per_layer_inputs)
            hidden = self._altup_streams(inputs_embeds)
        else:
            hidden = inputs_embeds
        produced: dict[int, tuple] = {}  # cache layer -> (present_key, present_value, key, value)
        reader_presents = []  # the KV-shared layers' presents: the same buffers, in layer order
        for i, layer in enumerate(self.layers):
            source = v.kv_source(i)
            shared = produced.get(source)
            past_kv = past_of[i] if shared is None else shared[:2]
            hidden, new = layer(hidden, None, None, past_kv, None if shared is None else shared[2:],
                                kinds[(v.layer_types[i], layer_windowed_rows(v, source, self.max_context) is not None)],
                                per_layer[:, :, i, :] if v.gemma3n else None)
            if shared is None:
                produced[i] = new
            else:
                reader_presents += new[:2]
        presents = [t for layer in cache_layers for t in produced[layer][:2]]
        return self._logits(hidden, valid), presents + reader_presents

    def _logits(self, hidden, valid):
        v = self.variant
        last = (valid - 1).reshape(1)
        if v.gemma3n:
            hidden = self._altup_merge(hidden.index_select(2, last))
        else:
            hidden = hidden.index_select(1, last)
        logits = torch.matmul(self.norm(hidden), self.lm_head_t).reshape(1, v.vocab_size)
        if v.final_logit_softcap is not None:
            logits = torch.tanh(logits / v.final_logit_softcap) * v.final_logit_softcap
        return logits
