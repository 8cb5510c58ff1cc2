"""The text decoder as NPU targets need it: static T, no index arithmetic in the graph.

The same layers and weights as model/text.py's TextDecoder; only the inputs around them differ.
Everything the CPU graph derives from `position` and `valid` with Range/Mod/comparisons/Where
(rope angles, the causal and sliding-window masks, the pick of the last valid row) comes from
the host instead (the runtime's gemma_runtime/npu_inputs.py computes it, from the manifest's
`npu_inputs` that npu_inputs_spec writes; tests/test_runtime_npu.py holds it equal to layers.py's
rope_tables and attention_masks, the functions of the CPU graph):

    inputs_embeds [1,T,H], per_layer_inputs [1,T,L,P] (Gemma 3n)
    cos.K, sin.K      [T,d]   rope tables of the chunk's positions, per layer kind K
    mask_past.K       [T,S_K] additive: 0 where a query may attend a cache slot, MASK_VALUE where not
    mask_new.K        [T,T]   additive, the chunk's own keys (causal, sliding window)
    last              [1,1,T] one-hot of the last valid row (Mul + ReduceSum pick it: no Gather on `valid`)
    past_key.N, past_value.N  [1,KV,S,d]
      -> logits [1,V], new_key.N, new_value.N [1,KV,T,d]

K is "sliding" or "global". Masks are additive floats, not booleans with -inf: a quantized graph
needs finite ranges, and MASK_VALUE is far enough below any attention score that exp() of it is 0
in float32 (and a uint16 scale over [MASK_VALUE, max score] keeps steps ~0.002).
"""

from __future__ import annotations

import torch
from gemma_runtime.manifest import NpuAttentionKind, NpuInputs
from torch import nn

from ..variants import FULL, SLIDING, Variant
from .layers import rope_inv_freq
from .text import TextDecoder

MASK_VALUE = -100.0
KINDS = {SLIDING: "sliding", FULL: "global"}


def layer_kinds(variant: Variant) -> list[str]:
    """The layer types of this variant, in a fixed order (one rope table and mask pair each)."""
    return [t for t in (SLIDING, FULL) if t in variant.layer_types]


def npu_inputs_spec(variant: Variant, max_context: int) -> NpuInputs:
    """What the host needs to compute the graphs' rope tables and masks (the manifest's
    `npu_inputs`): per layer kind its rope theta, inverse frequencies (layers.py's, bit for bit)
    and linear factor, its caches' length and its sliding window (None where the kind attends
    globally, as attention_masks decides)."""
    kinds = []
    for t in layer_kinds(variant):
        layer = next(i for i in variant.cache_layers if variant.layer_types[i] == t)
        name = KINDS[t]
        kinds.append(NpuAttentionKind(
            name=name, rope_theta=float(variant.rope_theta[t]), rope_linear_factor=float(variant.rope_linear_factor[t]),
            inv_freq=tuple(float(f) for f in rope_inv_freq(variant, t)),
            mask_length=variant.cache_length(layer, max_context),
            window=variant.sliding_window if t == SLIDING else None,
            cos=f"cos.{name}", sin=f"sin.{name}", mask_past=f"mask_past.{name}", mask_new=f"mask_new.{name}",
        ))
    return NpuInputs(head_dim=variant.head_dim, mask_value=MASK_VALUE, kinds=tuple(kinds))


def npu_input_names(variant: Variant) -> list[str]:
    names = ["inputs_embeds"] + (["per_layer_inputs"] if variant.gemma3n else [])
    for t in layer_kinds(variant):
        names += [f"cos.{KINDS[t]}", f"sin.{KINDS[t]}"]
    for t in layer_kinds(variant):
        names += [f"mask_past.{KINDS[t]}", f"mask_new.{KINDS[t]}"]
    names.append("last")
    for layer in variant.cache_layers:
        names += [f"past_key.{layer}", f"past_value.{layer}"]
    return names


class NpuDecoder(nn.Module):
    """Flat positional signature in npu_input_names order, for torch.onnx.export."""

    def __init__(self, decoder: TextDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, *args):
        d = self.decoder
        v = d.variant
        it = iter(args)
        embeds = next(it)
        per_layer_rows = next(it) if v.gemma3n else None
        kinds = layer_kinds(v)
        rope = {t: (next(it), next(it)) for t in kinds}
        masks = {t: (next(it), next(it)) for t in kinds}
        last = next(it)
        past = list(it)
        past_of = {layer: (past[2 * i], past[2 * i + 1]) for i, layer in enumerate(v.cache_layers)}

        if v.gemma3n:
            per_layer = d._per_layer_inputs(embeds, per_layer_rows)
            hidden = d._altup_streams(embeds)
        else:
            hidden = embeds
        # the layer loop of TextDecoder.forward, with masks looked up by layer type
        new_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(d.layers):
            source = v.kv_source(i)
            hidden, new = layer(
                hidden, *rope[v.layer_types[i]], past_of[source], new_rows.get(source), masks[v.layer_types[source]],
                per_layer[:, :, i, :] if v.gemma3n else None,
            )
            new_rows.setdefault(source, new)

        # the last valid row: sum over T of hidden * one-hot [(A,)1,T,H] * [1,T,1], not last @ hidden:
        # the HTP rounds a MatMul's second activation operand to 8 bits (the residual stream here; the
        # real Gemma 3 270M's final one spans +-31000: steps of ~250), while Mul and ReduceSum of a
        # one-hot are exact
        hidden = (hidden * last.reshape(1, -1, 1)).sum(dim=-2, keepdim=True)
        if v.gemma3n:
            hidden = d._altup_merge(hidden)
        logits = torch.matmul(d.norm(hidden), d.lm_head_t).reshape(1, v.vocab_size)
        if v.final_logit_softcap is not None:
            logits = torch.tanh(logits / v.final_logit_softcap) * v.final_logit_softcap
        return (logits, *[t for layer in v.cache_layers for t in new_rows[layer]])
