"""Every named full-size variant, built on torch's meta device: forward shapes for a prefill chunk
(T=128) and a decode step (T=1), the cache layers, and the parameter count, computed here from the
config fields alone and checked against the published model sizes."""

from __future__ import annotations

import pytest
import torch

from gemma_export.model.text import TextDecoder
from gemma_export.variants import NAMED_VARIANTS, variant_from_config
from gemma_export.weights import RandomTensors, check_names, weight_map

MAX_CONTEXT = 4096

# Published sizes in parameters, and the tolerance. Gemma / Gemma 3: the whole model, the tied
# token table counted once (= our decoder graph with its LM head). Gemma 3n: the "effective"
# sizes quoted for E2B / E4B (~1.91B / ~3.98B), which leave out the token and per-layer tables
# (and are rounder, hence the wider band).
PUBLISHED = {
    "gemma-2b": (2.51e9, "with_head", 0.02),
    "gemma-7b": (8.54e9, "with_head", 0.02),
    "gemma3-270m": (0.268e9, "with_head", 0.02),
    "gemma3-1b": (1.0e9, "with_head", 0.02),
    "e2b": (1.91e9, "without_head", 0.05),
    "e4b": (3.98e9, "without_head", 0.05),
}
CACHE_LAYERS = {"e2b": 20, "e4b": 20, "gemma-2b": 18, "gemma-7b": 28, "gemma3-270m": 18, "gemma3-1b": 26}


def expected_parameters(cfg: dict) -> tuple[int, int]:
    """(decoder parameters without the LM head, LM head), from config.json's fields."""
    H, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter = cfg["intermediate_size"]
    inter = inter if isinstance(inter, list) else [inter] * L
    gemma3n = cfg["model_type"] == "gemma3n_text"
    owners = L - cfg.get("num_kv_shared_layers", 0)
    total = H  # final norm
    for layer in range(L):
        owns = layer < owners
        total += 2 * H * nh * d + (2 * H * kv * d if owns else 0)  # q, o; k, v
        total += 3 * H * inter[layer]  # gate, up, down
        total += 2 * H  # input / post-attention norms
        if cfg["model_type"] != "gemma":
            total += 2 * H + d + (d if owns else 0)  # pre/post feed-forward norms, q_norm, k_norm
        if gemma3n:
            A, P, r = cfg["altup_num_inputs"], cfg["hidden_size_per_layer_input"], cfg["laurel_rank"]
            total += H + A * A + A * A * A + H * A + H  # AltUp: output scale, coefs, router, router norm
            total += 2 * H * r + H  # LAuReL
            total += 2 * H * P + H  # per-layer gate, projection, norm
    if gemma3n:
        A, P = cfg["altup_num_inputs"], cfg["hidden_size_per_layer_input"]
        total += H * L * P + P + 2 * (A - 1) * H * H
    return total, V * H


@pytest.fixture(scope="module", params=sorted(NAMED_VARIANTS))
def built(request):
    name = request.param
    variant = variant_from_config(NAMED_VARIANTS[name].config, expected=name)
    with torch.device("meta"):
        model = TextDecoder(variant, MAX_CONTEXT)
    return name, variant, model


def _inputs(variant, chunk):
    embeds = torch.zeros(1, chunk, variant.hidden_size)
    per_layer = torch.zeros(1, chunk, variant.num_layers, variant.gemma3n.per_layer_dim) if variant.gemma3n else None
    past = []
    for layer in variant.cache_layers:
        shape = (1, variant.num_kv_heads, variant.cache_length(layer, MAX_CONTEXT), variant.head_dim)
        past += [torch.zeros(shape), torch.zeros(shape)]
    return embeds, per_layer, torch.tensor([7]), torch.tensor([chunk]), past


@pytest.mark.parametrize("chunk", [128, 1])
def test_forward_shapes_on_meta(built, chunk):
    name, variant, model = built
    with torch.device("meta"), torch.no_grad():
        logits, new_rows = model(*_inputs(variant, chunk))
    assert logits.shape == (1, variant.vocab_size)
    assert len(new_rows) == 2 * len(variant.cache_layers)
    for row in new_rows:
        assert row.shape == (1, variant.num_kv_heads, chunk, variant.head_dim)


def test_cache_layers(built):
    name, variant, _ = built
    cfg = NAMED_VARIANTS[name].config
    assert len(variant.cache_layers) == CACHE_LAYERS[name]
    assert len(variant.cache_layers) == cfg["num_hidden_layers"] - cfg.get("num_kv_shared_layers", 0)
    if variant.gemma3n:  # shared layers read the last earlier owner of their attention type
        first_shared = variant.num_layers - variant.gemma3n.num_kv_shared_layers
        for layer in range(first_shared, variant.num_layers):
            source = variant.kv_source(layer)
            assert source < first_shared and variant.layer_types[source] == variant.layer_types[layer]
            assert not any(variant.layer_types[i] == variant.layer_types[layer] for i in range(source + 1, first_shared))
    for layer in variant.cache_layers:
        want = min(variant.sliding_window, MAX_CONTEXT) if variant.layer_types[layer] == "sliding_attention" else MAX_CONTEXT
        assert variant.cache_length(layer, MAX_CONTEXT) == want


def test_parameter_count(built):
    name, variant, model = built
    body, head = expected_parameters(NAMED_VARIANTS[name].config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == body + head
    published, kind, tolerance = PUBLISHED[name]
    size = body + head if kind == "with_head" else body
    assert abs(size - published) <= tolerance * published, f"{name}: {size / 1e9:.3f}B vs published {published / 1e9:.3f}B"


def test_random_weights_have_the_checkpoint_layout(built):
    """--random-weights names every tensor as a checkpoint would, and the strict map accepts it."""
    name, variant, model = built
    names = RandomTensors(variant).names()
    check_names(weight_map(variant, model, names), names)
