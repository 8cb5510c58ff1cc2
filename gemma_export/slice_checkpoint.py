"""`gemma-export slice`: write a MatFormer slice of a Gemma 3n checkpoint as a Hugging Face folder.

    gemma-export slice --variant e4b --matformer NAME [--checkpoint PATH_OR_HUB_ID] DIR

DIR gets config.json (the slice's), the sliced weights as safetensors in the source's stored dtype
(one model.safetensors, or shards of at most SHARD_BYTES with model.safetensors.index.json, written
one shard at a time so memory stays bounded), the tokenizer / processor / generation files the
checkpoint has, and matformer_slice.json (the slice's record, as in an export's manifest).
transformers loads DIR strictly: the sliced names and shapes are exactly those of a model built from
the new config (plus, for the released layout, the k/v weights of KV-shared layers that
transformers itself ignores on load). Written into a temporary folder beside DIR and renamed at
the end, like an export.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ExportError
from .matformer import MatformerError, parameter_counts, resolve_slice, slice_checkpoint, slice_record, describe

SHARD_BYTES = 2 << 30
RECORD = "matformer_slice.json"
# copied besides the checkpoint's AUX_FILE_NAMES: the processor's own config
EXTRA_FILES = ("processor_config.json",)
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _parser() -> argparse.ArgumentParser:
    from .variants import NAMED_VARIANTS

    p = argparse.ArgumentParser(
        prog="gemma-export slice",
        description="Write a MatFormer slice of a Gemma 3n checkpoint (E4B) as a Hugging Face checkpoint folder.",
    )
    p.add_argument("out", metavar="DIR", type=Path, help="output folder (written atomically)")
    p.add_argument("--variant", choices=list(NAMED_VARIANTS), help="expected model; its default checkpoint if --checkpoint is not given")
    p.add_argument("--checkpoint", help="Hugging Face folder or hub id")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to download")
    add_slice_arguments(p)
    p.add_argument("--shard-size", type=float, default=SHARD_BYTES / 2**20, metavar="MIB", help="largest shard (MiB, default 2048)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def add_slice_arguments(p: argparse.ArgumentParser) -> None:
    """--matformer, --matformer-config, --ffn-dims, --skip-layers (export and slice)."""
    g = p.add_argument_group("MatFormer slicing (Gemma 3n E4B)")
    g.add_argument("--matformer", metavar="NAME", help="a slice by its name in the slicing table (e.g. 'Config for official E2B Model')")
    g.add_argument("--matformer-config", metavar="FILE", help="another slicing table in the same CSV format")
    g.add_argument("--ffn-dims", metavar="LIST", help="custom slice: FFN size of each kept layer (8192,8192,... or one size for all)")
    g.add_argument("--skip-layers", metavar="LIST", help="custom slice: source layers to skip (20,21 or 20-24)")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD).is_file())):
        raise ExportError(f"{out} exists and is not a folder written by 'gemma-export slice': choose another DIR")


def _nbytes(tensors, name: str) -> int:
    import math

    return math.prod(tensors.shape(name)) * _BYTES.get(tensors.dtype(name) or "F32", 4)


def _shards(tensors, names: list[str], limit: int) -> list[list[str]]:
    """Consecutive groups of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = _nbytes(tensors, name)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_sliced_folder(ckpt, config: dict, tensors, record: dict, out: Path, shard_bytes: int = SHARD_BYTES,
                        progress=None) -> list[Path]:
    """Write the sliced checkpoint into `out` atomically; return the weight files written."""
    from safetensors.torch import save_file

    _check_out(out)
    names = tensors.names()
    groups = _shards(tensors, names, shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        files = ["model.safetensors"] if len(groups) == 1 else [
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        weight_map, total = {}, 0
        for file, group in zip(files, groups):
            shard = {}
            for name in group:
                shard[name] = tensors.get_stored(name)
                total += shard[name].numel() * shard[name].element_size()
                weight_map[name] = file
                if progress:
                    progress(name)
            save_file(shard, staging / file, metadata={"format": "pt"})
            del shard
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (staging / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        for name, path in sorted(_aux_files(ckpt).items()):
            shutil.copyfile(path, staging / name)
        staging.chmod(0o755)
        for f in staging.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.time_ns()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / f for f in files]


def _aux_files(ckpt) -> dict[str, Path]:
    aux = dict(ckpt.aux_files)
    files = getattr(ckpt.tensors, "files", None)
    if callable(files) and files():
        folder = files()[0].parent
        aux.update({n: folder / n for n in EXTRA_FILES if (folder / n).is_file()})
    return aux


def main(argv: list[str]) -> int:
    from .checkpoint import open_checkpoint
    from .plan import _default_source
    from .progress import Progress
    from .variants import _architecture, named_variant, variant_from_config

    args = _parser().parse_args(argv)
    start = time.perf_counter()
    s = resolve_slice(args.matformer, args.matformer_config, args.ffn_dims, args.skip_layers)
    if s is None:
        raise MatformerError("say which slice: --matformer NAME (from the table), or --ffn-dims/--skip-layers")
    if args.shard_size <= 0:
        raise ExportError(f"--shard-size must be a positive number of MiB, got {args.shard_size}")
    if not args.checkpoint and not args.variant:
        raise ExportError("say what to slice: --variant e4b (its default checkpoint) or --checkpoint PATH_OR_HUB_ID")
    if args.variant:
        named_variant(args.variant)
    _check_out(args.out)
    ckpt = open_checkpoint(args.checkpoint or _default_source(args.variant), revision=args.revision)
    if not hasattr(ckpt.tensors, "get_stored"):
        raise ExportError(f"{ckpt.source}: 'gemma-export slice' writes safetensors from a Hugging Face folder; this checkpoint is not one")
    variant_from_config(ckpt.config, expected=args.variant)  # the source is a checkpoint we support
    config, tensors, plan = slice_checkpoint(ckpt.config, ckpt.tensors, s)
    variant_from_config(config, expected=args.variant)  # and so is its slice
    record = slice_record(s, plan, parameter_counts(tensors, _architecture(config)), args.matformer_config)
    record["source"] = ckpt.source
    progress = Progress(enabled=not args.quiet)
    progress.expect_weights(len(tensors.names()))
    with progress.step(f"writing the sliced checkpoint ({len(tensors.names())} tensors)"):
        files = write_sliced_folder(ckpt, config, tensors, record, args.out, int(args.shard_size * 2**20), progress.tick_weight)
    size = sum(f.stat().st_size for f in files)
    print(f"gemma-export: {describe(record)}")
    print(f"gemma-export: wrote {args.out} ({len(files)} safetensors file(s), {size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
