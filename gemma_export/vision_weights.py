"""Checkpoint tensors -> the vision graph's model, by a declared name map, strictly.

Within the vision prefixes of a Gemma3nForConditionalGeneration checkpoint

    model.vision_tower.timm_model.<timm name>        -> tower.<timm name>     (every tensor of timm's tower)
    model.embed_vision.soft_embedding_norm.weight    -> soft_norm.weight
    model.embed_vision.embedding_projection.weight   -> projection.weight
    model.embed_vision.embedding.weight              } hard path: not in the graph; hard_token_rows()
    model.embed_vision.hard_embedding_norm.weight    } embeds those ids for embed_tokens.bin

every tensor has exactly one destination or is declared unused with its reason, and every
parameter of the model gets exactly one tensor of the same shape. Anything else is an error
naming the weight. Tensors outside the vision prefixes (text, audio) are not this map's business.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .model.vision import SoftEmbedRMSNorm, VisionEncoder, VisionSpec
from .weights import TensorSource, WeightMapError

TOWER_PREFIX = "model.vision_tower.timm_model."
EMBEDDER_PREFIX = "model.embed_vision."
VISION_PREFIXES = (TOWER_PREFIX, EMBEDDER_PREFIX)

EMBEDDER_PARAMS = {  # checkpoint name (under EMBEDDER_PREFIX) -> model parameter
    "soft_embedding_norm.weight": "soft_norm.weight",
    "embedding_projection.weight": "projection.weight",
}
HARD_PATH = {  # checkpoint name (under EMBEDDER_PREFIX) -> why the graph does not use it
    "embedding.weight": "hard-token table: embedded at export time into embed_tokens.bin (hard_token_rows)",
    "hard_embedding_norm.weight": "hard-token norm: embedded at export time into embed_tokens.bin (hard_token_rows)",
}


@dataclass(frozen=True)
class VisionWeightMap:
    params: dict[str, str]  # checkpoint name -> model parameter (or buffer) name
    ignored: dict[str, str]  # checkpoint name -> why the vision graph does not use it


def vision_weight_map(encoder: VisionEncoder) -> VisionWeightMap:
    params = {}
    for name in encoder.state_dict():
        if name.startswith("tower."):
            params[TOWER_PREFIX + name.removeprefix("tower.")] = name
    params.update({EMBEDDER_PREFIX + ckpt: param for ckpt, param in EMBEDDER_PARAMS.items()})
    destinations = set(params.values())
    orphans = sorted(set(encoder.state_dict()) - destinations)
    if orphans:  # a model tensor the map forgot: a bug here, not in the checkpoint
        raise WeightMapError(f"vision model tensor(s) with no checkpoint name: {', '.join(orphans)}")
    ignored = {EMBEDDER_PREFIX + ckpt: why for ckpt, why in HARD_PATH.items()}
    return VisionWeightMap(params=params, ignored=ignored)


def check_vision_names(wmap: VisionWeightMap, checkpoint_names: list[str]) -> None:
    """Strict both ways within the vision prefixes, before anything is loaded."""
    have = {n for n in checkpoint_names if n.startswith(VISION_PREFIXES)}
    if not have:
        raise WeightMapError("the checkpoint has no vision weights (model.vision_tower.*, model.embed_vision.*)")
    unmapped = sorted(have - set(wmap.params) - set(wmap.ignored))
    missing = sorted(set(wmap.params) - have)
    problems = []
    for what, names in (("checkpoint vision weight(s) with no destination", unmapped),
                        ("vision weight(s) missing from the checkpoint", missing)):
        if names:
            problems.append(f"{len(names)} {what}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else ""))
    if problems:
        raise WeightMapError("; ".join(problems))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def load_vision(spec: VisionSpec, tensors: TensorSource, progress=None) -> VisionEncoder:
    """Build on the meta device and fill one tensor at a time (peak: the float32 model + one tensor)."""
    with torch.device("meta"):
        encoder = VisionEncoder(spec)
    wmap = vision_weight_map(encoder)
    check_vision_names(wmap, tensors.names())
    expected = encoder.state_dict()
    for ckpt_name, name in wmap.params.items():
        value = tensors.get(ckpt_name).to(torch.float32)
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightMapError(f"{ckpt_name} has shape {tuple(value.shape)}, the model expects {tuple(expected[name].shape)}")
        _set_tensor(encoder, name, value)
        if progress:
            progress(ckpt_name)
    return encoder.eval()


def hard_token_rows(spec: VisionSpec, tensors: TensorSource) -> torch.Tensor:
    """The embedder's hard path for every vision-vocabulary id (vocab_offset + i -> row i):
    embedding -> hard_embedding_norm -> embedding_projection -> post-projection norm,
    [vision vocab_size, H] float32, for embed_tokens.bin."""
    table = tensors.get(EMBEDDER_PREFIX + "embedding.weight").to(torch.float32)
    hard_norm = SoftEmbedRMSNorm(table.shape[1], spec.rms_norm_eps)
    hard_norm.weight = nn.Parameter(tensors.get(EMBEDDER_PREFIX + "hard_embedding_norm.weight").float(), requires_grad=False)
    projection = tensors.get(EMBEDDER_PREFIX + "embedding_projection.weight").to(torch.float32)
    post_norm = SoftEmbedRMSNorm(projection.shape[0], spec.rms_norm_eps, with_scale=False)
    with torch.no_grad():
        return post_norm(hard_norm(table) @ projection.t())


class RandomVisionTensors:
    """A TensorSource with the checkpoint's vision names and shapes and seeded random values
    (RMS norm scales around 1, layer scales around 0.5, matrices and kernels ~ 1/sqrt(fan_in))."""

    def __init__(self, spec: VisionSpec, seed: int = 0, vocab_size: int = 128):
        with torch.device("meta"):
            encoder = VisionEncoder(spec)
        wmap = vision_weight_map(encoder)
        state = encoder.state_dict()
        self._shapes = {ckpt: tuple(state[name].shape) for ckpt, name in wmap.params.items()}
        self._shapes[EMBEDDER_PREFIX + "embedding.weight"] = (vocab_size, spec.hidden_size)
        self._shapes[EMBEDDER_PREFIX + "hard_embedding_norm.weight"] = (spec.hidden_size,)
        self._seed = seed

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        gen = torch.Generator().manual_seed(zlib.crc32(f"{self._seed}:{name}".encode()))
        noise = torch.randn(shape, generator=gen)
        if name.endswith(".gamma"):  # layer scales (timm initializes them to 1e-5: blocks would be no-ops)
            return 0.5 + 0.1 * noise
        if len(shape) == 1:  # RMS norm scales around 1; biases small
            return 1.0 + 0.1 * noise if name.endswith(".weight") else 0.02 * noise
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        return noise * fan_in**-0.5
