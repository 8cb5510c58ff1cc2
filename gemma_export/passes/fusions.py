"""Contrib-op fusions for onnxruntime's CPU/CUDA providers: a pure pass ModelProto -> ModelProto.

The exported decoder spells every block out in standard ONNX ops; onnxruntime's own graph
optimizer does not recognise our spellings (RMSNorm as x * (mean(x^2) + eps)^-0.5, rope with
cos/sin computed from `position`), so each layer runs ~100 small kernels. This pass rewrites:

    Mul(Mul(x, Pow(Add(ReduceMean(Pow(x, 2)), eps), -0.5)), w)  ->  SimplifiedLayerNormalization(x, w)
    (the same without w: Gemma 3n's value norm)                   ->  SimplifiedLayerNormalization(x, 1)
    SimplifiedLayerNormalization(Add(a, b), w)                    ->  SkipSimplifiedLayerNormalization(a, b, w)
                                                                     (its 4th output is a + b, the residual)
    0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))         ->  FastGelu(x)
    x * cos + rotate_half(x) * sin, cos/sin = Cos/Sin(Concat(f, f)),
      f = positions[:, None] * inv_freq                           ->  RotaryEmbedding(x, 0, Cos(f), Sin(f))

The rotary rewrite keeps the graph's own cos/sin arithmetic (same float32 ops, computed once per
run for the chunk's T positions) and hands RotaryEmbedding that [T, d/2] table with position id 0,
so row t of the table is position `position + t`: no cache of max-context rows, no bound to check.

The norm, skip-norm and gelu rules are onnxscript's (onnxscript.rewriter.ort_fusions) where our
graph matches them; the RMSNorm spelling and the rope tables are ours. Attention stays as
exported (DESIGN.md's past + new blocks, no Concat of the cache): onnxruntime's fused attention
ops want a cache that grows by Concat (MultiHeadAttention) or a shared buffer updated in place
with a linear, not ring, sliding cache (GroupQueryAttention): a different KV contract.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.ort_fusions.gelu import gelu_rules
from onnxscript.rewriter.ort_fusions.rotary_embedding import rotary_embedding_rules
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

MS_DOMAIN = "com.microsoft"
_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate functions (rotary)


@dataclass(frozen=True)
class FusionReport:
    """What a fusion pass did: node counts and how many times each rule fired."""

    nodes_before: int
    nodes_after: int
    fusions: dict[str, int]
    op_types_after: dict[str, int]

    def to_dict(self) -> dict:
        return {"nodes_before": self.nodes_before, "nodes_after": self.nodes_after,
                "fusions": dict(self.fusions), "op_types_after": dict(self.op_types_after)}


def _copy_type(dst: ir.Value, src: ir.Value) -> ir.Value:
    """Rewrites make values with no type; later rules check shapes, so say what they are."""
    dst.type, dst.shape = src.type, src.shape
    return dst


def _last_dim(x: ir.Value) -> int | None:
    if x.shape is None or x.shape.rank() is None or x.shape.rank() < 1:
        return None
    d = x.shape[-1]
    return d if isinstance(d, int) else None


def _is_last_axis(axes: ir.Value, x: ir.Value) -> bool:
    value = _ir_utils.get_singleton_value(axes)
    rank = x.shape.rank() if x.shape is not None else None
    return value == -1 or (rank is not None and value == rank - 1)


class _RmsNormPow(pattern.RewriteRuleClassBase):
    """Our RMSNorm (layers.RMSNorm): x * (mean(x^2, -1) + eps)^-0.5 [* w]."""

    def __init__(self, scaled: bool):
        super().__init__(f"RmsNormPow{'Scaled' if scaled else ''}")
        self._scaled = scaled

    def pattern(self, op, x, axes, eps, scale):
        mean_square = op.ReduceMean(op.Pow(x, 2.0), axes, keepdims=1, noop_with_empty_axes=0)
        normed = op.Mul(x, op.Pow(op.Add(mean_square, eps), -0.5))
        return op.Mul(normed, scale) if self._scaled else normed

    def check(self, context, x, axes, eps, scale=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        d = _last_dim(x)
        if x.dtype != ir.DataType.FLOAT or d is None:
            return result.fail("x is not float32 with a static last dimension", x)
        if not _is_last_axis(axes, x):
            return result.fail("not a mean over the last axis", axes)
        if not isinstance(_ir_utils.get_singleton_value(eps), float):
            return result.fail("epsilon is not a float constant", eps)
        if self._scaled and (scale.shape is None or list(scale.shape) != [d] or scale.dtype != ir.DataType.FLOAT):
            return result.fail("scale is not a float32 [d] vector", scale)
        return result

    def rewrite(self, op, x, eps, scale=None, **_):
        if scale is None:
            scale = op.initializer(ir.tensor(np.ones(_last_dim(x), dtype=np.float32), name=f"{x.name}_unit_scale"))
        out = op.SimplifiedLayerNormalization(x, scale, axis=-1, epsilon=_ir_utils.get_singleton_value(eps),
                                              stash_type=1)
        return _copy_type(out, x)


def _scalar(value: ir.Value) -> float | None:
    """The float of a one-element float constant, else None."""
    if value.const_value is None or value.dtype != ir.DataType.FLOAT or value.const_value.size != 1:
        return None
    return float(value.const_value.numpy().reshape(()))


def _times(gamma: ir.Value, factor: float) -> np.ndarray:
    return (gamma.const_value.numpy().astype(np.float32) * np.float32(factor)).astype(np.float32)


class _NormTimesScalar(pattern.RewriteRuleClassBase):
    """SimplifiedLayerNormalization(x, w) * c -> SimplifiedLayerNormalization(x, w * c): Gemma 3n
    scales the AltUp router's normed input by 1/H."""

    def __init__(self):
        super().__init__("NormTimesScalar")
        # one scaled copy per (scale, factor): a norm's weight may serve several norms
        self._scaled: dict[tuple[ir.Value, float], ir.Value] = {}

    def pattern(self, op, x, gamma, c):
        return op.Mul(op.SimplifiedLayerNormalization(x, gamma, _allow_other_attributes=True, _outputs=["normed"]), c)

    def check(self, context, gamma, c, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if gamma.const_value is None:
            return result.fail("the norm's scale is not a constant", gamma)
        if _scalar(c) is None:
            return result.fail("not a product with a float scalar constant", c)
        return result

    def rewrite(self, op, x, gamma, c, normed, **_):
        attrs, key = normed.producer().attributes, (gamma, _scalar(c))
        if key not in self._scaled:
            self._scaled[key] = op.initializer(ir.tensor(_times(gamma, key[1]), name=f"{gamma.name}_x{key[1]:.6g}"))
        out = op.SimplifiedLayerNormalization(x, self._scaled[key], axis=attrs.get_int("axis", -1),
                                              epsilon=attrs.get_float("epsilon", 1e-5), stash_type=attrs.get_int("stash_type", 1))
        return _copy_type(out, x)

    def cleanup(self):
        self._scaled.clear()


class _RopeTables(pattern.RewriteRuleClassBase):
    """onnxscript's rotary match (a function of x, cos, sin) fed by our tables -> com.microsoft
    RotaryEmbedding with the [T, d/2] half-tables and position id 0 (row t = the chunk's t-th token).

        f = Mul(Unsqueeze(Cast(positions)), inv_freq)       [T, d/2]
        cos, sin = Cos(Concat(f, f)), Sin(Concat(f, f))      [T, d]
    """

    def __init__(self):
        # cos/sin are shared by every layer's q and k: leave them, unused ones are swept after
        super().__init__("RopeTables", remove_nodes=False)
        self._tables: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        self._zero: ir.Value | None = None  # one position-id initializer for every match

    def pattern(self, op, x, freqs, interleaved, num_heads):
        emb = op.Concat(freqs, freqs, axis=-1)
        return op.RotaryEmbedding(x, op.Cos(emb), op.Sin(emb), interleaved=interleaved, num_heads=num_heads,
                                  _domain=_FUSION_DOMAIN)

    def check(self, context, x, freqs, interleaved, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        d = _last_dim(x)
        if x.shape is None or x.shape.rank() != 4 or d is None or not isinstance(x.shape[1], int):
            return result.fail("x is not [B, heads, T, d] with static heads and d", x)
        if interleaved.value != 0:
            return result.fail("interleaved rope", x)
        if freqs.shape is None or freqs.shape.rank() != 2 or freqs.shape[-1] != d // 2:
            return result.fail("frequencies are not [T, d/2]", freqs)
        return result

    def rewrite(self, op, x, freqs, num_heads, **_):
        if freqs not in self._tables:
            half = ir.Shape([freqs.shape[0], freqs.shape[1]])
            cos, sin = op.Cos(freqs), op.Sin(freqs)
            for v in (cos, sin):
                v.type, v.shape = freqs.type, half
            self._tables[freqs] = (cos, sin)
        cos, sin = self._tables[freqs]
        if self._zero is None:
            self._zero = op.initializer(ir.tensor(np.zeros(1, dtype=np.int64), name="rope_position_zero"))
        out = op.RotaryEmbedding(x, self._zero, cos, sin, interleaved=0, num_heads=num_heads.value, _domain=MS_DOMAIN)
        return _copy_type(out, x)

    def cleanup(self):
        self._tables.clear()
        self._zero = None


# two sets, applied in turn: rules are tried node by node, and the unscaled pattern would match
# inside every scaled norm first
SCALED_RMS_NORM_RULES = pattern.RewriteRuleSet([_RmsNormPow.rule(scaled=True)], commute=True)
UNSCALED_RMS_NORM_RULES = pattern.RewriteRuleSet([_RmsNormPow.rule(scaled=False)], commute=True)
ROPE_TABLE_RULES = pattern.RewriteRuleSet([_RopeTables.rule()])
NORM_SCALAR_RULES = pattern.RewriteRuleSet([_NormTimesScalar.rule()], commute=True)

# ops that commute with a scalar factor and pass a query through to its score MatMuls
_LINEAR_PASSTHROUGH = {("", "Transpose"), ("", "Reshape"), (MS_DOMAIN, "RotaryEmbedding")}


def fold_attention_scale(model: ir.Model) -> int:
    r"""Queries that come from a norm with a constant scale w (Gemma 3's q_norm) and whose every
    score MatMul is followed by the same scalar c (1/sqrt(query_pre_attn_scalar)): w becomes w * c
    and the score Muls go away. Rope, Transpose and Reshape are linear, so the scores are the same
    up to rounding. Returns the number of norms changed.

        SLN(x, w) -> Transpose -> RotaryEmbedding -> Reshape -> MatMul(., K_past) -> Mul(c)
                                                           \-> MatMul(., K_new)  -> Mul(c)
    """
    folded = 0
    for norm in list(model.graph):
        if norm.op_type != "SimplifiedLayerNormalization" or norm.inputs[1].const_value is None:
            continue
        value = norm.outputs[0]
        while len(value.uses()) == 1:
            user, slot = next(iter(value.uses()))
            if (user.domain, user.op_type) not in _LINEAR_PASSTHROUGH or slot != 0:
                break
            value = user.outputs[0]
        matmuls = [use.node for use in value.uses()]
        if not matmuls or any(m.op_type != "MatMul" or m.inputs[0] is not value for m in matmuls):
            continue
        muls = []
        for m in matmuls:
            users = list(m.outputs[0].uses())
            if len(users) != 1 or users[0].node.op_type != "Mul" or m.outputs[0] in model.graph.outputs:
                break
            mul = users[0].node
            other = mul.inputs[1] if mul.inputs[0] is m.outputs[0] else mul.inputs[0]
            muls.append((mul, m, _scalar(other)))
        factors = {c for _, _, c in muls}
        if len(muls) != len(matmuls) or len(factors) != 1 or None in factors:
            continue
        (factor,) = factors
        gamma = norm.inputs[1]
        if len(gamma.uses()) == 1 and gamma.is_initializer():
            # the norm's own weight: scaled under its name, so the weight keeps its place in the
            # data file (graph_passes.apply_graph_passes writes it back there)
            gamma.const_value = ir.tensor(_times(gamma, factor), name=gamma.name)
        else:
            new_gamma = ir.Value(name=f"{gamma.name}_x{factor:.6g}", const_value=ir.tensor(_times(gamma, factor)))
            new_gamma.type, new_gamma.shape = gamma.type, gamma.shape
            model.graph.register_initializer(new_gamma)
            norm.replace_input_with(1, new_gamma)
        for mul, m, _ in muls:
            mul.outputs[0].replace_all_uses_with(m.outputs[0])
            model.graph.remove(mul, safe=True)
        folded += 1
    return folded


def _op_counts(model: ir.Model) -> Counter:
    return Counter(f"{n.domain + ':' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}" for n in model.graph.all_nodes())


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def fuse_ir(model: ir.Model) -> dict[str, int]:
    """The fusions on an onnx-ir model, in place; returns how often each fired."""
    counts = {}
    counts["rms_norm"] = SCALED_RMS_NORM_RULES.apply_to_model(model)
    counts["rms_norm_unscaled"] = UNSCALED_RMS_NORM_RULES.apply_to_model(model)
    counts["norm_scalar"] = NORM_SCALAR_RULES.apply_to_model(model)
    counts["skip_rms_norm"] = skip_rms_normalization_ruleset.apply_to_model(model)
    counts["fast_gelu"] = gelu_rules.apply_to_model(model)
    counts["rotary_match"] = rotary_embedding_rules.apply_to_model(model)
    counts["rotary_embedding"] = ROPE_TABLE_RULES.apply_to_model(model)
    counts["attention_scale"] = fold_attention_scale(model)
    # rotary matches left unfused go back to plain ops; the helper functions go away
    common_passes.InlinePass()(model)
    for key in [k for k in model.functions if k[0] == _FUSION_DOMAIN]:
        del model.functions[key]
    model.opset_imports.pop(_FUSION_DOMAIN, None)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
    if any(n.domain == MS_DOMAIN for n in model.graph.all_nodes()):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    del counts["rotary_match"]
    return counts


def ort_fusions(model: onnx.ModelProto, base_dir: Path | str | None = None) -> tuple[onnx.ModelProto, FusionReport]:
    """A new model with the contrib-op fusions; `model` is not changed. Big initializers may be
    external references (onnx.load(..., load_external_data=False)) relative to `base_dir`: they
    stay references; only the few norm scales that get a factor folded in are read."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    ir_model = ir.from_proto(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(ir_model.graph, str(base_dir))
    before = _node_count(ir_model)
    counts = fuse_ir(ir_model)
    report = FusionReport(before, _node_count(ir_model), counts, dict(sorted(_op_counts(ir_model).items())))
    return ir.to_proto(ir_model), report
