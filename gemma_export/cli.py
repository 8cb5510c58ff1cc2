"""gemma-export: the command line. Export is the default action; `eval` compares two exports
(evaluate.py); `slice` writes a MatFormer slice as a Hugging Face folder (slice_checkpoint.py);
`bench` runs our runtime beside other engines (bench/compare.py); `check` reports whether an export fits a target (check.py)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .errors import ExportError

SUBCOMMANDS = ("eval", "bench", "check", "slice")


def _export_parser() -> argparse.ArgumentParser:
    from .recipes import TABLE_FORMATS
    from .targets import target_names
    from .variants import NAMED_VARIANTS

    p = argparse.ArgumentParser(
        prog="gemma-export",
        description="Export a Gemma checkpoint to a folder of ONNX graphs for gemma-run. "
        f"Subcommands: {', '.join(SUBCOMMANDS)} (write ./eval for a folder so named).",
    )
    p.add_argument("out", metavar="OUT", type=Path, help="output folder (written atomically)")
    p.add_argument("--variant", choices=list(NAMED_VARIANTS), help="expected model; its default checkpoint if --checkpoint is not given")
    p.add_argument("--checkpoint", help="Hugging Face folder, .gguf file, or hub id")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to download")
    p.add_argument("--quant", help="recipe: fp32, fp16, int8, int4 (recipes.py); default: the target's (fp32 for cpu)")
    q = p.add_argument_group("recipe options (int4/int8)")
    q.add_argument("--block-size", type=int, help="weights per block along K: 16, 32 (default), 64 or 128")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None, help="zero point per block")
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="no zero points (int8 default)")
    sym.add_argument("--affine", action="store_true", default=None, help="float zero points: a fitted offset per block (int4 default)")
    q.add_argument("--accuracy-level", type=int, help="MatMulNBits accuracy_level: 0 = float activations (default), 4 = int8 (faster, less exact)")
    q.add_argument("--lm-head", type=int, dest="lm_head_bits", help="LM head bits: 4 (rescored, see --lm-head-rescore), 8 (int4 default) or 32 (keep float)")
    q.add_argument("--lm-head-rescore", type=int, metavar="K",
                   help="a 4-bit LM head's K best candidates get their logits again from int8 rows "
                        "(default 512 with --lm-head 4; 0: none)")
    q.add_argument("--rtn", dest="scale_search", action="store_false", default=None, help="plain round-to-nearest scales (no search)")
    q.add_argument("--tables", choices=list(TABLE_FORMATS),
                   help="host table rows: float32, int8 or int4 per row (int8 under int4/int8)")
    p.add_argument("--target", default="cpu", choices=target_names(),
                   help="build target (targets/*.toml): providers, weight format, sizes; default cpu")
    p.add_argument("--max-context", type=int, help="tokens the KV cache holds (default: the target's, 4096 for cpu)")
    p.add_argument("--prefill-chunk", type=int, help="tokens per prefill step (default: the target's, 128 for cpu)")
    p.add_argument("--random-weights", action="store_true", help="full-size variant with random weights (benchmarks)")
    p.add_argument("--text-only", action="store_true",
                   help="multimodal Gemma 3n checkpoints: skip the vision and audio encoders (no vision.onnx/audio.onnx; "
                   "the export then takes text only)")
    p.add_argument("--calibration-media", type=Path, metavar="DIR",
                   help="NPU targets (qnn-htp), multimodal Gemma 3n: a folder of images and audio files that the "
                   "encoders' activation ranges are recorded on (default: $GEMMA_EXPORT_CALIBRATION_MEDIA, "
                   "else a built-in synthetic image and clip)")
    p.add_argument("--graph-passes", metavar="NAMES",
                   help="graph passes on decoder.onnx after quantization: comma-separated names "
                   "(passes/graph_passes.py: ort-fusions) or none; default: the target's (cpu: ort-fusions)")
    from .slice_checkpoint import add_slice_arguments

    add_slice_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _export(argv: list[str]) -> int:
    args = _export_parser().parse_args(argv)
    from .package import write_export
    from .passes.blockwise import search_threads
    from .plan import ExportRequest, make_plan
    from .progress import Progress
    from .recipes import RecipeOptions

    search_threads()  # a bad GEMMA_EXPORT_THREADS fails now, not minutes into the export
    start = time.perf_counter()
    passes = None
    if args.graph_passes is not None:
        from .passes.graph_passes import passes_for_target

        passes = passes_for_target(args.graph_passes, args.target)
    plan = make_plan(ExportRequest(
        variant=args.variant, checkpoint=args.checkpoint, revision=args.revision, quant=args.quant,
        target=args.target, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
        random_weights=args.random_weights, text_only=args.text_only, calibration_media=args.calibration_media,
        recipe_options=RecipeOptions(block_size=args.block_size, symmetric=args.symmetric, accuracy_level=args.accuracy_level,
                                     lm_head_bits=args.lm_head_bits, lm_head_rescore=args.lm_head_rescore, scale_search=args.scale_search, tables=args.tables,
                                     affine=args.affine),
        matformer=args.matformer, matformer_config=args.matformer_config, ffn_dims=args.ffn_dims, skip_layers=args.skip_layers,
    ))
    if passes is not None:
        plan = dataclasses.replace(plan, graph_passes=passes)
    manifest = write_export(plan, args.out, Progress(enabled=not args.quiet))
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"gemma-export: wrote {args.out} ({manifest.family}, {manifest.quant}, {size / 2**20:.0f} MiB) "
          f"in {time.perf_counter() - start:.0f} s")
    if "matformer" in manifest.provenance:
        from .matformer import describe

        print(f"gemma-export: {describe(manifest.provenance['matformer'])}; export on disk {size / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "eval":
            from .evaluate import main as eval_main

            return eval_main(argv[1:])
        if argv and argv[0] == "bench":
            from .bench.compare import main as bench_main

            return bench_main(argv[1:])
        if argv and argv[0] == "check":
            from .check import main as check_main

            return check_main(argv[1:])
        if argv and argv[0] == "slice":
            from .slice_checkpoint import main as slice_main

            return slice_main(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            raise ExportError(f"'gemma-export {argv[0]}' is not available in this version yet")
        return _export(argv)
    except ExportError as err:
        print(f"gemma-export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemma-export: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
