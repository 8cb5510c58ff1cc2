"""Our int8/int4 recipes against onnxruntime-genai's int4 builds of the same Gemma 3 270M weights.

    .venv/bin/python bench/genai_quality.py [--reference /work/cache/real270m-fp32] [--ours DIR ...]
        [--genai /work/cache/genai-270m-int4 ...] [--tokens 4096] [--json FILE]

Builds first (a venv of their own, see bench/build_genai.py):

    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-int4 --precision int4
    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-fp32 --precision fp32
    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-int4-acc1 --precision int4 \
        --extra-options accuracy_level=1
    /work/venvs/genai/bin/python bench/build_genai.py --out /work/cache/genai-270m-int4-kquant-mixed --precision int4 \
        --extra-options accuracy_level=1 algo_config=k_quant_mixed

Every model runs the same token ids: the first --tokens tokens of CPython's docs text
(evaluate.cpython_docs_text, as bench/quant_quality.py), encoded by the reference export's
tokenizer.json; each genai build's own tokenizer.json must give the same ids (checked). The
reference is our fp32 export of the same weights (the genai builds start from the same float32
tensors: build_genai.py writes them with gemma-export's GGUF reader). Scores are those of
`gemma-export eval` (evaluate.evaluate_sources): top-1 agreement with the reference, mean
KL(reference || candidate), perplexity and its ratio to the reference's. The genai fp32 build is the
sanity check of the adapter (gemma_export/evaluate_genai.py): it should agree ~100%.

Memory: every model's session is open at once (the reference's logits are computed once per chunk):
~7 GiB with our fp32/int8/int4 and three genai int4 builds; the genai fp32 build adds ~2 GiB. On a
shared 24 GiB machine leave it out (--genai with the int4 folders only) and check it on its own.

Measured (2026-11-24, shared 2-core machine under heavy load, so --tokens 1024; same weights, same ids):

    model                               top-1    KL(fp32||q)  ppl ratio  size MiB
    ours int8                           98.05%   0.00126      0.9945     483
    ours int4 (recipes.int4)            92.19%   0.03006      1.0156     450
    genai int4 (default: RTN sym, acc4) 64.45%   0.55697      1.7731     200
    genai int4 accuracy_level=1         65.04%   0.55372      1.7676     200
    genai int4 k_quant_mixed, acc 1     79.10%   0.20633      1.2923     297
    genai fp32 (adapter sanity)        100.00%   0.00000      1.0000

Measured 2026-12-01 at --tokens 4096 (int4 now at accuracy level 4 with its affine blocks as a
symmetric MatMulNBits plus offsets, bench/int4_kernels.py; genai int4 rebuilt by build_genai.py):

    model                               top-1    KL(fp32||q)  ppl ratio  size MiB
    ours int8                           98.10%   0.00106      0.9980     482
    ours int4 (recipes.int4)            90.70%   0.03383      1.0221     449
    genai int4 (default: RTN sym, acc4) 63.57%   0.59861      1.9236     200

--ours: our quantized exports to score (default: int8 and int4 derived from --reference with
requantize_export into --workdir, the same passes as `gemma-export --quant`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gemma_export.evaluate import _Runner, cpython_docs_text, encode_text, evaluate_sources, format_table
from gemma_export.evaluate_genai import GenaiSource

CACHE = Path("/work/cache")
GENAI_DEFAULT = [CACHE / n for n in ("genai-270m-fp32", "genai-270m-int4", "genai-270m-int4-acc1", "genai-270m-int4-kquant-mixed")]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


def _ours(reference: Path, workdir: Path, recipes: list[str]) -> list[Path]:
    from gemma_export.package import requantize_export
    from gemma_export.recipes import make_recipe

    outs = []
    for name in recipes:
        out = workdir / f"ours-{name}"
        if not (out / "manifest.json").is_file():
            start = time.perf_counter()
            requantize_export(reference, out, make_recipe(name))
            print(f"genai_quality: {out} requantized in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        outs.append(out)
    return outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, default=CACHE / "real270m-fp32", help="our fp32 export of Gemma 3 270M")
    p.add_argument("--ours", type=Path, nargs="*", help="our quantized exports (default: int8, int4 requantized into --workdir)")
    p.add_argument("--workdir", type=Path, default=CACHE / "genai-cmp")
    p.add_argument("--genai", type=Path, nargs="*", help="onnxruntime-genai build folders (default: those of the docstring that exist)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json", type=Path, help="write the result here too")
    args = p.parse_args()
    genai = args.genai if args.genai is not None else [g for g in GENAI_DEFAULT if (g / "genai_config.json").is_file()]
    if not genai:
        raise SystemExit("genai_quality: no onnxruntime-genai build found: run bench/build_genai.py first (see --help)")
    ours = args.ours if args.ours is not None else _ours(args.reference, args.workdir, ["int8", "int4"])
    text = cpython_docs_text()
    ids = encode_text(args.reference, text)[: args.tokens]
    for g in genai:
        if encode_text(g, text)[: args.tokens] != ids:
            raise SystemExit(f"genai_quality: {g}/tokenizer.json gives other ids than {args.reference}: not comparable")
    ref = _Runner(args.reference, None)
    sources = [_Runner(o, None) for o in ours] + [GenaiSource(g, label=f"genai:{g.name}") for g in genai]
    m = ref.manifest
    result = evaluate_sources(ref, sources, ids, m.max_context, m.prefill_chunk, m.tokens.bos, progress=True)
    sizes = {src.label: _size(f) for src, f in zip([ref, *sources], [args.reference, *ours, *genai])}
    print(format_table(result))
    print("size on disk (MiB):")
    for label, size in sizes.items():
        print(f"  {label[-40:]:<40} {size / 2**20:9.1f}")
    report = {"eval": result.to_dict(), "size_bytes": sizes, "text": "pydoc_data.topics (CPython docs), first tokens"}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
