"""Which tensors cost the most in int4: one group of weights at a time in 4 bits, the rest fp32.

    .venv/bin/python bench/int4_sensitivity.py [--export /work/cache/real270m-fp32] [--tokens 512]
        [--groups coarse|fine] [--no-calibration] [--json FILE]

Starting from the fp32 export, each group of weight MatMuls (passes/matmuls.weight_matmuls, named by
the exporter's module paths) is replaced by its int4 round trip in the int4 recipe's own 4-bit
format (recipes.int4: affine blocks of 32, the block search weighted by the same calibration
statistics as `gemma-export --quant int4`; blockwise.quantize then dequantize), and the model is
scored against the fp32 logits under teacher forcing (top-1 agreement, mean KL(fp32 || group in
int4)) on the first --tokens tokens of CPython's docs text, as `gemma-export eval` does.

MatMulNBits at accuracy level 0 (the recipe's) dequantizes its blocks to float32 and multiplies in
float32, so the round trip in a float graph has the same arithmetic without a graph per group: the
weights become graph inputs of one session (evaluate._Runner's transform/fixed_feeds), and each
group only changes what is fed.

Groups: coarse (default): per layer its attention (q, k, v, o) and its MLP (gate, up, down), the
LM head, and each projection kind across all layers; fine: every weight on its own (127 on
Gemma 3 270M: slower). Prints the 10 costliest groups (by KL) and all of them as JSON, with each
group's quantization type in the source GGUF: the only real checkpoint here is a Q4_K_M GGUF, whose
Q4_K tensors (o_proj, half the down_proj) are already 4-bit affine blocks of 32 and cost ~nothing;
the costs measured are those of the Q5_0/Q6_K/Q8_0 tensors re-gridded to 4 bits.

Measured (2026-11-24, --tokens 128, calibration on, 456 s on a loaded 2-core machine), KL / top-1:
all layers up_proj 0.0211 / 90.6%, lm_head 0.0188 / 95.3%, gate_proj 0.0104 / 95.3%, down_proj
0.0082 / 97.7%, v_proj 0.0082 / 96.9% (the most per parameter), k_proj 0.0036, q_proj 0.0023,
o_proj 0 (Q4_K in the GGUF); single layers: the MLPs of layers 3, 1, 17, 0 cost the most (~0.004).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from gemma_export.evaluate import _log_softmax, _Runner, _segments, calibration_ids, collect_importance, cpython_docs_text, encode_text
from gemma_export.passes import blockwise
from gemma_export.passes.matmuls import WeightMatMul, weight_matmuls
from gemma_export.recipes import int4

_LAYER = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def weights_as_inputs(weights: list[WeightMatMul]):
    """A transform: the named weight initializers become float graph inputs of the same shape."""
    names = {w.weight for w in weights}

    def transform(model: onnx.ModelProto) -> onnx.ModelProto:
        graph = model.graph
        kept = [t for t in graph.initializer if t.name not in names]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        for w in weights:
            graph.input.append(helper.make_tensor_value_info(w.weight, onnx.TensorProto.FLOAT, list(w.shape)))
        return model

    return transform


def groups_of(weights: list[WeightMatMul], fine: bool) -> dict[str, list[WeightMatMul]]:
    groups: dict[str, list[WeightMatMul]] = defaultdict(list)
    for w in weights:
        if w.tensor_class == "lm_head":
            groups["lm_head"].append(w)
            continue
        m = _LAYER.search(w.module)
        if m is None:
            raise SystemExit(f"int4_sensitivity: weight {w.module} is neither the LM head nor a layer's attention/MLP")
        layer, block, proj = m.groups()
        if fine:
            groups[f"layer {int(layer):2d} {proj}"].append(w)
        else:
            groups[f"layer {int(layer):2d} {'attention' if block == 'self_attn' else 'mlp'}"].append(w)
            groups[f"all layers {proj}"].append(w)
    # the projection kinds first, the LM head (the slowest to quantize) last: a run cut short still
    # has the coarse picture
    order = sorted(groups, key=lambda g: (not g.startswith("all layers"), g.startswith("lm_head"), g))
    return {g: groups[g] for g in order}


def mapped(folder: Path, t: onnx.TensorProto) -> np.ndarray:
    """A float32 weight read-only from its external data file by memory map: the pages are the
    file's (dropped under memory pressure, shared with the page cache), not this process's."""
    ext = {e.key: e.value for e in t.external_data}
    if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type != onnx.TensorProto.FLOAT:
        raise SystemExit(f"int4_sensitivity: weight {t.name} is not an external float32 tensor")
    return np.memmap(folder / ext["location"], dtype=np.float32, mode="r", offset=int(ext.get("offset", 0)),
                     shape=tuple(t.dims))


def gguf_types(weights: list[WeightMatMul]) -> dict[str, str]:
    """Weight initializer -> its quantization type in the source GGUF (the checkpoint's own grid:
    a Q4_K tensor is 4-bit affine blocks of 32 already, so its int4 round trip is nearly exact)."""
    from gemma_export.checkpoint import default_gguf_path
    from gemma_export.gguf_checkpoint import open_gguf

    tensors = open_gguf(default_gguf_path()).tensors
    hf = {w.weight: "model.embed_tokens.weight" if w.tensor_class == "lm_head"
          else "model." + w.module.removeprefix("decoder.") + ".weight" for w in weights}
    return {k: tensors.quant_type(v) for k, v in hf.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, default=Path("/work/cache/real270m-fp32"), help="fp32 export of Gemma 3 270M")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--groups", choices=["coarse", "fine"], default="coarse")
    p.add_argument("--no-calibration", action="store_true", help="plain (unweighted) block search")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    start = time.perf_counter()
    folder = args.export
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    weights = weight_matmuls(model)
    inits = {t.name: t for t in model.graph.initializer}
    fp32 = {w.weight: mapped(folder, inits[w.weight]) for w in weights}
    del model, inits
    source_types = gguf_types(weights)
    fmt = int4().attention  # the recipe's 4-bit format (affine, blocks of 32, search)
    importance = None
    if not args.no_calibration:
        importance = collect_importance(folder, calibration_ids(folder)[0])
    print(f"int4_sensitivity: {len(weights)} weights, calibration {'off' if importance is None else 'on'} "
          f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    runner = _Runner(folder, None, transform=weights_as_inputs(weights))
    m = runner.manifest
    ids = encode_text(folder, cpython_docs_text())[: args.tokens]
    segments = list(_segments(ids, m.tokens.bos, m.max_context))
    chunk = m.prefill_chunk

    def logprobs(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Per chunk: log-probabilities [scored, V] of every predicted position."""
        runner.fixed_feeds.update(feeds)
        out = []
        for seg in segments:
            runner.reset()
            for first in range(0, len(seg), chunk):
                piece = seg[first:first + chunk]
                scored = min(len(piece), len(seg) - 1 - first)
                logits = runner.chunk_logits(piece, first, chunk)
                if scored > 0:
                    out.append(_log_softmax(logits[:scored]))
        return out

    ref = logprobs(fp32)
    ref_top = [lp.argmax(1) for lp in ref]
    quantized: dict[str, tuple[np.ndarray, float]] = {}

    def round_trip(w: WeightMatMul) -> np.ndarray:
        if w.weight not in quantized:
            imp = None if importance is None else importance[w.weight]
            codes = blockwise.quantize(fp32[w.weight], fmt.bits, fmt.block_size, fmt.symmetric, fmt.scale_search, fmt.affine, imp)
            quantized[w.weight] = (blockwise.dequantize(codes).astype(np.float32), codes.rel_error)
        return quantized[w.weight][0]

    rows = []
    groups = groups_of(weights, args.groups == "fine")
    uses = defaultdict(int)  # a round trip is kept until its last group has run
    for members in groups.values():
        for w in members:
            uses[w.weight] += 1
    for i, (name, members) in enumerate(groups.items()):
        t0 = time.perf_counter()
        feeds = dict(fp32)
        feeds.update({w.weight: round_trip(w) for w in members})
        lq = logprobs(feeds)
        n = sum(len(x) for x in lq)
        kl = sum(float((np.exp(a) * (a - b)).sum(dtype=np.float64)) for a, b in zip(ref, lq)) / n
        top1 = sum(int((b.argmax(1) == t).sum()) for b, t in zip(lq, ref_top)) / n
        params = sum(int(np.prod(w.shape)) for w in members)
        rel = float(np.sqrt(sum(quantized[w.weight][1] ** 2 * np.prod(w.shape) for w in members) / params))
        types = "/".join(sorted({source_types[w.weight] for w in members}))
        rows.append({"group": name, "tensors": len(members), "params": params, "gguf": types, "kl": kl, "top1": top1,
                     "rel_weight_error": rel})
        del feeds, lq
        for w in members:
            uses[w.weight] -= 1
            if not uses[w.weight]:
                quantized[w.weight] = (None, quantized[w.weight][1])  # the error stays for the table
        print(f"int4_sensitivity: [{i + 1}/{len(groups)}] {name:<24} KL {kl:.5f} top-1 {100 * top1:6.2f}% "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if args.json:  # after every group: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"partial": True, "rows": rows}, indent=1))
    rows.sort(key=lambda r: -r["kl"])
    print(f"int4 sensitivity on {args.export}: {sum(len(x) for x in ref)} tokens, {args.groups} groups, "
          f"format {fmt.bits}-bit b{fmt.block_size} {'affine' if fmt.affine else 'sym'}, calibration "
          f"{'off' if importance is None else 'on'}; costliest 10 by KL(fp32 || group in int4):")
    print(f"{'group':<26} {'tensors':>7} {'params':>10} {'GGUF type':>10} {'rel err':>8} {'KL':>9} {'top-1':>8} {'KL/Mparam':>10}")
    for r in rows[:10]:
        print(f"{r['group']:<26} {r['tensors']:>7} {r['params']:>10} {r['gguf']:>10} {r['rel_weight_error']:8.4f} {r['kl']:9.5f} "
              f"{100 * r['top1']:7.2f}% {r['kl'] / r['params'] * 1e6:10.5f}")
    report = {"export": str(args.export), "tokens": args.tokens, "groups": args.groups,
              "calibration": importance is not None, "seconds": time.perf_counter() - start, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
