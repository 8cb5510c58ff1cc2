"""Quality, size and export memory of the quantization recipes on Gemma 3 270M (the GGUF on PyPI).

    python bench/quant_quality.py WORKDIR [--recipes int8 int4 ...] [--tokens 4096] [--rss]
                                          [--genai HF_DIR]

For each recipe: `gemma-export --variant gemma3-270m --quant R` under /usr/bin/time -v (with --rss:
peak RSS of the whole export; otherwise the recipe is derived from the fp32 export by the same
passes, requantize_export), the folder's size on disk, and `gemma-export eval` against the fp32
export on the first --tokens tokens of CPython's documentation text (pydoc_data.topics).

--genai HF_DIR: also onnxruntime-genai's int4 build of the same weights (HF_DIR is the GGUF written
as a Hugging Face folder), scored with its own session (input_ids, attention_mask,
past_key_values.*) on the same tokens. Its graph returns logits for every input position.

Note: the checkpoint's weights already lie on 4- to 8-bit grids (Q4_K, Q5_0, Q6_K, Q8_0); that
flatters every method equally, the comparison on the same weights stays fair.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gemma_export.evaluate import _log_softmax, cpython_docs_text, encode_text, evaluate_ids, format_table
from gemma_export.package import requantize_export
from gemma_export.recipes import make_recipe


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _export_with_rss(out: Path, recipe: str) -> tuple[float, float]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gemma_export.cli", "--variant", "gemma3-270m",
           "--quant", recipe, "--quiet", str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return time.perf_counter() - start, rss_kb / 2**20


def _genai_scores(model_dir: Path, ids: list[int], bos: int, ref_folder: Path) -> dict:
    """Teacher-forced logits of onnxruntime-genai's model.onnx (all positions, one pass per
    segment, empty past), scored against the fp32 export's all-positions logits on the same
    segments as gemma-export eval (evaluate._segments: BOS + up to max_context - 1 tokens)."""
    import onnxruntime as ort

    from gemma_export.evaluate import _Runner, _segments

    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    head_size = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    ref = _Runner(ref_folder, None)
    chunk = ref.manifest.prefill_chunk
    agree = kl = nll = nll_ref = 0.0
    n = 0
    seconds = 0.0
    for seq in _segments(ids, bos, ref.manifest.max_context):
        ref.cache.reset()
        feeds = {"input_ids": seq[None], "attention_mask": np.ones((1, len(seq)), dtype=np.int64)}
        for name, arg in inputs.items():
            if name.startswith("past_key_values"):
                # [batch, kv heads, past length, head size]: an empty past; the head size may be
                # symbolic ('kv_cache_dim'): genai_config.json has it
                shape = [1 if d == "batch_size" else head_size if d == "kv_cache_dim" else 0 if isinstance(d, str) else d
                         for d in arg.shape]
                feeds[name] = np.zeros(shape, dtype=np.float32)
            elif name == "position_ids":
                feeds[name] = np.arange(len(seq), dtype=np.int64)[None]
        start = time.perf_counter()
        logits = sess.run(["logits"], feeds)[0][0]
        seconds += time.perf_counter() - start
        targets = len(seq) - 1
        for first in range(0, len(seq), chunk):
            piece = seq[first:first + chunk]
            lp = _log_softmax(ref.chunk_logits(piece, first, chunk))
            scored = min(len(piece), targets - first)
            if scored <= 0:
                break
            lp, lq = lp[:scored], _log_softmax(logits[first:first + scored].astype(np.float32))
            tgt = seq[first + 1:first + 1 + scored]
            agree += float((lp.argmax(1) == lq.argmax(1)).sum())
            kl += float((np.exp(lp) * (lp - lq)).sum(dtype=np.float64))
            nll += float(-lq[np.arange(scored), tgt].sum())
            nll_ref += float(-lp[np.arange(scored), tgt].sum())
        n += targets
    ppl, ppl_ref = float(np.exp(nll / n)), float(np.exp(nll_ref / n))
    return {"tokens": n, "top1": agree / n, "kl": kl / n, "ppl": ppl, "ppl_ratio": ppl / ppl_ref, "seconds": seconds,
            "size": _size(model_dir)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--recipes", nargs="+", default=["int8", "int4", "fp16"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rss", action="store_true", help="export every recipe from the checkpoint under /usr/bin/time -v")
    p.add_argument("--genai", type=Path, help="folder of onnxruntime-genai's int4 build (model.onnx)")
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    fp32 = work / "fp32"
    if args.rss or not (fp32 / "manifest.json").exists():
        seconds, rss = _export_with_rss(fp32, "fp32")
        rows["fp32"] = {"export_s": seconds, "peak_rss_gib": rss}
    for recipe in args.recipes:
        out = work / recipe
        if args.rss:
            seconds, rss = _export_with_rss(out, recipe)
            rows[recipe] = {"export_s": seconds, "peak_rss_gib": rss}
        else:
            start = time.perf_counter()
            requantize_export(fp32, out, make_recipe(recipe))
            rows[recipe] = {"requantize_s": time.perf_counter() - start}
    for name in ["fp32", *args.recipes]:
        rows.setdefault(name, {})["size_mib"] = _size(work / name) / 2**20
    ids = encode_text(fp32, cpython_docs_text())[: args.tokens]
    result = evaluate_ids(fp32, [work / r for r in args.recipes], ids, progress=True)
    print(format_table(result))
    report = {"rows": rows, "eval": result.to_dict()}
    if args.genai:
        from gemma_runtime.manifest import read_manifest

        report["genai_int4"] = _genai_scores(args.genai, ids, read_manifest(fp32).tokens.bos, fp32)
        print("onnxruntime-genai int4:", json.dumps(report["genai_int4"]))
    print(json.dumps(rows, indent=1))
    (work / "quant_quality.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
