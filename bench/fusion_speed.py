"""Decode/prefill speed of the fused decoder (--graph-passes ort-fusions) against the standard-ONNX
one (--graph-passes none), same weights, one process, runs interleaved (a benchmark, not a test).

    python bench/fusion_speed.py FP32_OUT [--recipes fp32,int4] [--threads 2] [--prompt-tokens 128]
                                 [--new-tokens 128] [--repeat 5] [--work DIR] [--json PATH]

FP32_OUT is an fp32 export made with --graph-passes none (e.g. `gemma-export --variant
gemma3-270m --graph-passes none OUT`). For each recipe, both variants are derived from it with
requantize_export (the int4 recipe without its calibration run: same graph, faster to build) into
--work, loaded side by side, and generation alternates A, B, A, B... so that both see the same
machine load; medians and the fused/unfused ratios are printed, with node counts per graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx

from gemma_export.package import requantize_export
from gemma_export.recipes import RecipeOptions, make_recipe
from gemma_runtime import Model


# --recipes names: a named recipe, or one with command-line options (int4 with uint8 zero points
# and int8-activation kernels: onnxruntime 1.32's CPU MatMulNBits is far slower with float zero
# points or with 8-bit weights at accuracy level 0, which the default int4 recipe uses)
RECIPE_SPECS = {
    "int4-sym-acc4": ("int4", RecipeOptions(symmetric=True, accuracy_level=4)),
}


def _variants(src: Path, work: Path, recipe_name: str) -> dict[str, Path]:
    base, options = RECIPE_SPECS.get(recipe_name, (recipe_name, RecipeOptions()))
    recipe = make_recipe(base, options)
    if recipe.calibration is not None:  # the calibration run changes weights, not the graph
        recipe = dataclasses.replace(recipe, calibration=None)
    out = {}
    for label, passes in (("unfused", ()), ("fused", ("ort-fusions",))):
        folder = work / f"{recipe_name}-{label}"
        if not (folder / "manifest.json").is_file():
            requantize_export(src, folder, recipe, graph_passes=passes)
        out[label] = folder
    return out


def _nodes(folder: Path) -> int:
    return len(onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node)


def _measure(folders: dict[str, Path], threads: int, n_prompt: int, n_new: int, repeat: int) -> dict:
    models = {k: Model.load(v, threads=threads) for k, v in folders.items()}
    first = next(iter(models.values()))
    rng = np.random.default_rng(0)
    prompt = [first.manifest.tokens.bos] + rng.integers(1000, 20000, n_prompt - 1).tolist()
    runs: dict[str, dict[str, list[float]]] = {k: {"prefill_tps": [], "decode_tps": []} for k in models}
    tokens = {}
    for m in models.values():
        m.generate_ids(prompt[:16], max_new_tokens=4)  # warm-up
    for _ in range(repeat):
        for label, m in models.items():
            tokens[label] = m.generate_ids(prompt, max_new_tokens=n_new)
            runs[label]["prefill_tps"].append(m.last_stats.prefill_tokens_per_second)
            runs[label]["decode_tps"].append(m.last_stats.decode_tokens_per_second)
    result = {k: {key: statistics.median(v) for key, v in r.items()} | {"runs": r} for k, r in runs.items()}
    result["same_tokens"] = len({tuple(t) for t in tokens.values()}) == 1
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="fp32 export made with --graph-passes none")
    ap.add_argument("--recipes", default="fp32,int4", help=f"comma-separated: recipes.py names or {', '.join(RECIPE_SPECS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--work", type=Path, help="where the derived exports go (kept; default: a temporary folder)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manifest = json.loads((args.src / "manifest.json").read_text())
    if manifest["provenance"].get("graph_passes", {}).get("passes"):
        raise SystemExit(f"{args.src} already ran graph passes: export it with --graph-passes none")
    work = args.work or Path(tempfile.mkdtemp(prefix="fusion-speed-"))
    report = {}
    for name in args.recipes.split(","):
        folders = _variants(args.src, work, name)
        r = _measure(folders, args.threads, args.prompt_tokens, args.new_tokens, args.repeat)
        nodes = {k: _nodes(v) for k, v in folders.items()}
        report[name] = {"nodes": nodes, **r}
        print(f"{manifest['variant']} {name}, {args.threads} threads, prompt {args.prompt_tokens}, new {args.new_tokens}, "
              f"median of {args.repeat} interleaved runs; same greedy tokens: {r['same_tokens']}")
        print(f"{'':18}{'unfused':>12}{'fused':>12}{'fused/unfused':>15}")
        print(f"{'decoder nodes':18}{nodes['unfused']:12d}{nodes['fused']:12d}{nodes['fused'] / nodes['unfused']:15.2f}")
        for key, label in (("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s")):
            a, b = r["unfused"][key], r["fused"][key]
            print(f"{label:18}{a:12.2f}{b:12.2f}{b / a:15.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
