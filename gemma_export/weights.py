"""Checkpoint tensors -> the export model and the host tables, by a declared name map, strictly.

Every checkpoint tensor has exactly one destination (a model parameter, a host table, or both for
a tied token table) or is on the declared list of known-unused weights with the reason beside it;
every destination gets exactly one tensor. Anything else is an error naming the weight.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from .errors import ExportError
from .model.layers import RMSNorm
from .model.text import TWO_BLOCK, TextDecoder
from .variants import Variant


class WeightMapError(ExportError):
    """A checkpoint weight has no destination, or a destination has no weight, or shapes differ."""


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...


# Where the text model lives inside each architecture's checkpoint.
TEXT_PREFIX = {
    "GemmaForCausalLM": "model.",
    "Gemma3ForCausalLM": "model.",
    "Gemma3nForCausalLM": "model.",
    "Gemma3nForConditionalGeneration": "model.language_model.",
}

EMBED_TOKENS = "embed_tokens"  # host table names, as in manifest.tables
PER_LAYER = "per_layer"


@dataclass(frozen=True)
class WeightMap:
    """Checkpoint name -> destination, for one variant."""

    params: dict[str, str]  # checkpoint name -> model parameter name
    tables: dict[str, str]  # checkpoint name -> host table name
    lm_head: str  # checkpoint name of the LM head weight ([V, H])
    ignored: dict[str, str]  # checkpoint name -> why it is not used


def _ignored(variant: Variant, names: list[str]) -> dict[str, str]:
    """The declared known-unused weights of this checkpoint."""
    reasons: list[tuple[str, str]] = []
    prefix = TEXT_PREFIX[variant.architecture]
    if variant.architecture == "Gemma3nForConditionalGeneration":
        reasons.append((
            r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.",
            "vision/audio towers and embedders: not part of the text decoder graphs",
        ))
    if variant.gemma3n:
        shared = [i for i in range(variant.num_layers) if variant.kv_source(i) != i]
        if shared:
            layers = "|".join(map(str, shared))
            reasons.append((
                rf"{re.escape(prefix)}layers\.({layers})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.",
                "KV-shared layer: reads its producer's cache; transformers drops these on load "
                "(_keys_to_ignore_on_load_unexpected)",
            ))
    out = {}
    for name in names:
        for pattern, why in reasons:
            if re.match(pattern, name):
                out[name] = why
    return out


def weight_map(variant: Variant, model: TextDecoder, checkpoint_names: list[str]) -> WeightMap:
    prefix = TEXT_PREFIX[variant.architecture]
    params = {prefix + name: name for name, _ in model.named_parameters() if name != "lm_head_t"}
    tables = {prefix + "embed_tokens.weight": EMBED_TOKENS}
    if variant.gemma3n:
        tables[prefix + "embed_tokens_per_layer.weight"] = PER_LAYER
    lm_head = prefix + "embed_tokens.weight" if variant.tie_word_embeddings else "lm_head.weight"
    return WeightMap(params=params, tables=tables, lm_head=lm_head, ignored=_ignored(variant, checkpoint_names))


def check_names(wmap: WeightMap, checkpoint_names: list[str]) -> None:
    """Strict both ways, before anything is loaded: fail fast, naming every offender."""
    have = set(checkpoint_names)
    wanted = set(wmap.params) | set(wmap.tables) | {wmap.lm_head}
    unmapped = sorted(have - wanted - set(wmap.ignored))
    missing = sorted(wanted - have)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} checkpoint weight(s) with no destination: {', '.join(unmapped[:8])}"
                        + (" ..." if len(unmapped) > 8 else ""))
    if missing:
        problems.append(f"{len(missing)} weight(s) missing from the checkpoint: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if problems:
        raise WeightMapError("; ".join(problems))


def _norm_params(model: nn.Module) -> set[str]:
    return {f"{mod_name}.weight" if mod_name else "weight"
            for mod_name, mod in model.named_modules() if isinstance(mod, RMSNorm) and mod.weight is not None}


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def decoder_sources(variant: Variant, max_context: int, tensors: TensorSource,
                    attention: str = TWO_BLOCK) -> tuple[TextDecoder, dict[str, Callable[[], torch.Tensor]]]:
    """The export model on the meta device and, per parameter name, a function that makes its
    float32 value from the checkpoint. Names and shapes are checked here; nothing is loaded, so a
    caller can hold one weight at a time (load_decoder, or the streamed export in stream_export.py)."""
    with torch.device("meta"):
        model = TextDecoder(variant, max_context, attention)
    names = tensors.names()
    wmap = weight_map(variant, model, names)
    check_names(wmap, names)
    norms = _norm_params(model)
    expected = dict(model.named_parameters())
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for ckpt_name, param_name in wmap.params.items():
        want = tuple(expected[param_name].shape)
        if tuple(tensors.shape(ckpt_name)) != want:
            raise WeightMapError(f"{ckpt_name} has shape {tuple(tensors.shape(ckpt_name))}, the model expects {want}")
        shift = variant.norm_shift if param_name in norms else 0
        sources[param_name] = functools.partial(_param_value, tensors, ckpt_name, want, shift)
    head_shape = (variant.vocab_size, variant.hidden_size)
    if tuple(tensors.shape(wmap.lm_head)) != head_shape:
        raise WeightMapError(f"{wmap.lm_head} has shape {tuple(tensors.shape(wmap.lm_head))}, expected {head_shape}")
    sources["lm_head_t"] = functools.partial(_lm_head_t, tensors, wmap.lm_head, head_shape)
    return model.eval(), sources


def _param_value(tensors: TensorSource, name: str, shape: tuple[int, ...], shift: float) -> torch.Tensor:
    value = tensors.get(name)
    if tuple(value.shape) != shape:
        raise WeightMapError(f"{name} has shape {tuple(value.shape)}, the model expects {shape}")
    return value + shift if shift else value  # the (1 + w) norm, folded once here


def _lm_head_t(tensors: TensorSource, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """The LM head [H, V]: the largest weight. Sources with `row_blocks` fill it a row block at a
    time, so the [V, H] original is never held beside it (one copy of the largest weight, not two)."""
    row_blocks = getattr(tensors, "row_blocks", None)
    if row_blocks is None:
        head = tensors.get(name)
        if tuple(head.shape) != shape:
            raise WeightMapError(f"{name} has shape {tuple(head.shape)}, expected {shape}")
        return head.t().contiguous()
    out = torch.empty(shape[1], shape[0])
    start = 0
    for block in row_blocks(name, 16384):
        if block.shape[1:] != shape[1:] or start + block.shape[0] > shape[0]:
            raise WeightMapError(f"{name} has rows of shape {tuple(block.shape[1:])} past row {start}, expected {shape}")
        out[:, start:start + block.shape[0]] = block.t()
        start += block.shape[0]
    if start != shape[0]:
        raise WeightMapError(f"{name} has {start} rows, expected {shape[0]}")
    return out


def load_decoder(variant: Variant, max_context: int, tensors: TensorSource, progress=None,
                 attention: str = TWO_BLOCK) -> TextDecoder:
    """Build the export model on the meta device and fill it one tensor at a time, so peak
    memory is the float32 model plus one tensor."""
    model, sources = decoder_sources(variant, max_context, tensors, attention)
    for param_name, make in sources.items():
        _set_param(model, param_name, make())
        if progress:
            progress(param_name)
    return model.eval()


def table_rows(tensors: TensorSource, wmap_table: str, scale: float, rows_per_step: int | None = None) -> Iterator[torch.Tensor]:
    """A host table's rows, multiplied by its embedding scale, in blocks (bounded memory: by
    default about 64 MB of float32 a block). Sources with `row_blocks` (random weights,
    safetensors) never hold the whole table (E2B's per-layer table is 8 GB in float32)."""
    if rows_per_step is None:
        rows_per_step = max(16, (1 << 24) // max(1, math.prod(tensors.shape(wmap_table)[1:])))
    row_blocks = getattr(tensors, "row_blocks", None)
    blocks = row_blocks(wmap_table, rows_per_step) if row_blocks is not None else _sliced(tensors.get(wmap_table), rows_per_step)
    for block in blocks:
        yield block * scale


def _sliced(table: torch.Tensor, rows_per_step: int) -> Iterator[torch.Tensor]:
    for start in range(0, table.shape[0], rows_per_step):
        yield table[start:start + rows_per_step]


class RandomTensors:
    """A TensorSource with the full checkpoint layout and random values (`--random-weights`):
    the names come from the same map, so random exports exercise the real loader."""

    def __init__(self, variant: Variant, seed: int = 0):
        with torch.device("meta"):
            model = TextDecoder(variant, 1)
        prefix = TEXT_PREFIX[variant.architecture]
        self._shapes = {prefix + n: tuple(p.shape) for n, p in model.named_parameters() if n != "lm_head_t"}
        self._shapes[prefix + "embed_tokens.weight"] = (variant.vocab_size, variant.hidden_size)
        if variant.gemma3n:
            g = variant.gemma3n
            self._shapes[prefix + "embed_tokens_per_layer.weight"] = (g.per_layer_vocab_size, variant.num_layers * g.per_layer_dim)
        if not variant.tie_word_embeddings:
            self._shapes["lm_head.weight"] = (variant.vocab_size, variant.hidden_size)
        self._seed = seed

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(f"{self._seed}:{name}".encode()))

    def get(self, name: str) -> torch.Tensor:
        return torch.randn(self._shapes[name], generator=self._generator(name)) * 0.02

    def row_blocks(self, name: str, rows_per_step: int) -> Iterator[torch.Tensor]:
        """get(name) in blocks of rows, equal to its slices: one generator drawn in order, each
        block (but the last) a multiple of 16 values (torch's normal sampler fills 16 at a time)."""
        shape = self._shapes[name]
        step = max(16, rows_per_step - rows_per_step % 16)
        gen = self._generator(name)
        for start in range(0, shape[0], step):
            yield torch.randn((min(step, shape[0] - start), *shape[1:]), generator=gen) * 0.02
