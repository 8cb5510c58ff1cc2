"""Speed and quality of the int4/int8 recipes' kernel choices on one fp32 export (a benchmark, not a test).

    .venv/bin/python bench/int4_kernels.py FP32_OUT [--work DIR] [--tokens 4096] [--threads 2]
        [--prompt-tokens 128] [--new-tokens 64] [--repeat 3] [--json PATH]

onnxruntime's CPU MatMulNBits has fast kernels only for some formats: float zero points (our
`--affine` blocks) and accuracy level 0 (float activations) send it down a path that
dequantizes the whole weight each run (bench/decode_profile.py). This derives the int4 (or int8)
recipe with each choice from FP32_OUT (requantize_export: the same passes and calibration as
`gemma-export --quant int4`), then, in one process:
  quality: `gemma-export eval`'s scores against FP32_OUT on the first --tokens tokens of
           CPython's docs text (top-1 agreement, KL(fp32 || q), perplexity ratio);
  speed:   prefill and decode tokens/s, runs interleaved A, B, C, ... so that all see the same
           machine load (medians of --repeat).

Measured 2026-12-01, real Gemma 3 270M, 4096 tokens, 2 threads, 128-token prompt + 64 new, on a
shared 2-core machine (load 2-8: compare rows of one run, not runs):

    run  choice               top-1    KL      ppl ratio  prefill t/s  decode t/s
    1    affine-acc0 (float zero points, as before)
                              91.31%   0.0314  1.0212      67.0         0.82
    1    affine-acc4          90.87%   0.0323  1.0215     137.5         3.28
    1    asym-acc0            84.69%   0.0972  1.0982      72.2         0.88
    1    asym-acc4            84.25%   0.0993  1.1009     192.3        24.75
    1    sym-acc4             84.03%   0.1207  1.1271     185.6        23.22
    2    affine-acc4 (symmetric MatMulNBits + offsets, passes/matmuls.py)
                              90.70%   0.0338  1.0221     317.3        58.42
    2    affine-acc0          91.31%   0.0314  1.0212     117.1         1.28
    2    asym-acc4            84.25%   0.0993  1.1009     524.5        71.62
    3    affine-acc4          90.70%   0.0338  1.0221     435.3        52.67
    3    affine-acc0-w8acc4   90.72%   0.0323  1.0214     393.9        42.90
    4    affine-acc4          90.70%   0.0338  1.0221     222.6        25.64
    4    int8-acc0            98.10%   0.0011  0.9980      68.4         0.81
    4    int8-acc4            96.68%   0.0033  0.9998     254.8        30.00
    5    affine-acc4          90.70%   0.0338  1.0221     465.7        58.12
    5    affine-acc4-head4    83.42%   0.0874  1.0829     468.1        66.81   (LM head int4 too)

Run 6 (2026-12-07, AMD EPYC, 2 threads, first 2048 tokens, 128-token prompt + 128 new, median of 5):
what the decode goal against onnxruntime-genai's int4 build costs in quality.

    6    head4-rescored       91.11%   0.0343  1.0292     824.2        81.67   (--quant int4 --lm-head 4)
    6    head4-sym-mlp        84.38%   0.0976  1.1047     818.1        91.07   (MLP without offsets)
    6    genai-like           74.12%   0.2424  1.3014     879.6        94.98   (all 4-bit, no rescoring)

In `gemma-export bench` beside genai's own build (168 MiB a step either way; its top-1 is 63.6% at
4096 tokens, bench/genai_quality.py), the genai-like export decoded at 1.07x / 1.11x of genai after
128 / 1024 tokens, prefill 2.67x / 2.42x: our graph and loop are faster on the same weights, and the
int4 recipe's 0.82-0.97x / 0.86-0.89x (two runs of the same session) is the price of its quality (affine MLP offsets: 1.12x
of decode; int8 attention and the rescored head: 1.04x more).

Float zero points run onnxruntime's slow path; so does any 8-bit weight below level 4 (the int4
recipe's LM head and k/v, and the whole int8 recipe). The checkpoint's Q4_K tensors are affine
blocks of 32 (a float offset each), which uint8 zero points cannot hold: hence affine. Since run 2
the int4 recipe is affine-acc4; int8 stays at level 0 (its quality target), 37x slower than level 4.
Run 5: an int4 LM head reads 80 MiB less a step (+15% decode) but misses the 90% top-1 target, so
the int4 recipe kept its LM head in int8 until its best 512 candidates were rescored from int8
rows (passes/rescore.py; recipes.int4 has the figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from gemma_export.evaluate import cpython_docs_text, encode_text, evaluate_ids
from gemma_export.package import requantize_export
from gemma_export.recipes import Recipe, RecipeOptions, WeightFormat, make_recipe
from fusion_speed import _measure as measure_speed  # bench/: interleaved runs, medians


def _eight_bit_at_acc4(recipe: Recipe) -> Recipe:
    """The recipe's 8-bit tensors (LM head, k/v) at accuracy level 4, its 4-bit ones as they are:
    onnxruntime's 8-bit MatMulNBits has a fast CPU kernel only with int8 activations."""
    def fast(fmt):
        return dataclasses.replace(fmt, accuracy_level=4) if fmt is not None and fmt.bits == 8 else fmt

    return dataclasses.replace(recipe, attention=fast(recipe.attention), mlp=fast(recipe.mlp), lm_head=fast(recipe.lm_head),
                               other=fast(recipe.other), overrides=tuple((m, fast(f)) for m, f in recipe.overrides))


def _symmetric_mlp(recipe: Recipe) -> Recipe:
    """The MLP in symmetric 4-bit blocks (no offsets: no block-sum and offsets MatMuls, no Add)."""
    return dataclasses.replace(recipe, mlp=dataclasses.replace(recipe.mlp, symmetric=True, affine=False))


def _genai_like(recipe: Recipe) -> Recipe:
    """What onnxruntime-genai's int4 build streams (bench/build_genai.py): every weight MatMul in
    symmetric 4-bit blocks of 32 at level 4, attention too, the LM head not rescored."""
    w4 = WeightFormat(bits=4, block_size=32, accuracy_level=4)
    return dataclasses.replace(_symmetric_mlp(recipe), attention=w4, lm_head=w4, lm_head_rescore=0)


# name: (recipe, options, change to the recipe made from them)
CHOICES = {
    "affine-acc0": ("int4", RecipeOptions(affine=True, accuracy_level=0), None),
    "affine-acc0-w8acc4": ("int4", RecipeOptions(affine=True, accuracy_level=0), _eight_bit_at_acc4),
    "affine-acc4": ("int4", RecipeOptions(affine=True, accuracy_level=4), None),
    "asym-acc0": ("int4", RecipeOptions(symmetric=False, accuracy_level=0), None),
    "asym-acc4": ("int4", RecipeOptions(symmetric=False, accuracy_level=4), None),
    "sym-acc4": ("int4", RecipeOptions(symmetric=True, accuracy_level=4), None),
    "int8-acc0": ("int8", RecipeOptions(accuracy_level=0), None),
    "int8-acc4": ("int8", RecipeOptions(accuracy_level=4), None),
    "affine-acc4-head4": ("int4", RecipeOptions(affine=True, accuracy_level=4, lm_head_bits=4), None),
    # gemma-export --quant int4 --lm-head 4 (4-bit head in blocks of 128, 512 candidates rescored)
    "head4-rescored": ("int4", RecipeOptions(lm_head_bits=4), None),
    "head4-sym-mlp": ("int4", RecipeOptions(lm_head_bits=4), _symmetric_mlp),
    "genai-like": ("int4", RecipeOptions(lm_head_bits=4), _genai_like),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/int4-kernels"))
    parser.add_argument("--choices", default=",".join(CHOICES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    folders = {}
    for name in args.choices.split(","):
        folders[name] = args.work / name
        if not (folders[name] / "manifest.json").exists():
            print(f"deriving {name} ...", flush=True)
            recipe_name, options, change = CHOICES[name]
            recipe = make_recipe(recipe_name, options)
            requantize_export(args.fp32, folders[name], change(recipe) if change else recipe)
    ids = encode_text(args.fp32, cpython_docs_text())[:args.tokens]
    quality = evaluate_ids(args.fp32, list(folders.values()), ids, threads=args.threads)
    speed = measure_speed(folders, args.threads, args.prompt_tokens, args.new_tokens, args.repeat)
    rows = {}
    print(f"{'choice':<14}{'top-1':>8}{'KL':>9}{'ppl ratio':>11}{'prefill t/s':>13}{'decode t/s':>12}")
    for (name, folder), scores in zip(folders.items(), quality.candidates):
        s = speed[name]
        rows[name] = {"top1": scores.top1, "kl": scores.kl, "ppl_ratio": scores.ppl_ratio, **s}
        print(f"{name:<14}{scores.top1:>8.2%}{scores.kl:>9.4f}{scores.ppl_ratio:>11.4f}"
              f"{s['prefill_tps']:>13.1f}{s['decode_tps']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": len(ids), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
