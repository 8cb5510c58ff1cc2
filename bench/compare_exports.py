"""Prefill and decode speed of two or more exports of one model, runs interleaved in one process
(a benchmark, not a test): A, B, A, B... so that all see the same machine load.

    .venv/bin/python bench/compare_exports.py OUT_A OUT_B [...] [--threads 2] [--prompt-tokens 128,1024]
        [--new-tokens 128] [--repeat 3] [--json PATH]

Prints, per prompt length, the median prefill and decode tokens/s of each export, its decoder node
count and kv_layout, the ratios to the first export, and whether the greedy tokens agree.
Written to measure the GroupQueryAttention graph (kv_layout shared_buffer) against the two-block
one of the same weights; any exports of one model compare the same way.

Measured 2026-12-01, real Gemma 3 270M int4 (gemma-export --variant gemma3-270m --quant int4, the
two-block one made before the cpu target had GroupQueryAttention), 2 threads, 128 new tokens,
median of 3: see the closing note of this stop (the machine was shared: ratios, not absolutes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from fusion_speed import _measure  # bench/: interleaved runs, medians


def _describe(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    nodes = len(onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node)
    return {"nodes": nodes, "kv_layout": manifest["kv_layout"], "quant": manifest["quant"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if len(args.exports) < 2:
        raise SystemExit("name at least two exports")
    labels = [str(p) for p in args.exports]
    about = {label: _describe(p) for label, p in zip(labels, args.exports)}
    report = {"threads": args.threads, "exports": about, "runs": {}}
    base = labels[0]
    for n_prompt in (int(x) for x in args.prompt_tokens.split(",")):
        r = _measure(dict(zip(labels, args.exports)), args.threads, n_prompt, args.new_tokens, args.repeat)
        report["runs"][n_prompt] = r
        print(f"prompt {n_prompt}, {args.new_tokens} new, {args.threads} threads, median of {args.repeat} "
              f"interleaved runs; same greedy tokens: {r['same_tokens']}")
        print(f"{'export':48}{'layout':>22}{'nodes':>7}{'prefill t/s':>13}{'decode t/s':>12}{'prefill x':>11}{'decode x':>10}")
        for label in labels:
            a = about[label]
            print(f"{label[-48:]:48}{a['kv_layout']:>22}{a['nodes']:7d}{r[label]['prefill_tps']:13.1f}"
                  f"{r[label]['decode_tps']:12.2f}{r[label]['prefill_tps'] / r[base]['prefill_tps']:11.3f}"
                  f"{r[label]['decode_tps'] / r[base]['decode_tps']:10.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
