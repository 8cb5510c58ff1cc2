"""Quality and emulated-HTP agreement of a qnn-htp export (static QDQ prefill/decode graphs).

    .venv/bin/python bench/npu_quality.py NPU_OUT --reference FP32_OUT [--checkpoint CKPT] [--tokens 256]
        [--htp-steps 4]

1. Quality: teacher forcing over the first --tokens tokens of CPython's docs text (the eval text of
   `gemma-export eval`): a prefill chunk, then one decode step per token, on onnxruntime's CPU
   provider running the QDQ graphs, against the fp32 export (same ids, its own graph): top-1
   agreement, mean KL(fp32 || qdq), perplexity of each and their ratio.
2. The emulated HTP (onnxruntime-qnn on x86-64, CPU fallback off) over a prompt of one prefill chunk
   and --htp-steps decode steps, against the CPU provider on the same QDQ graphs: max abs logit
   difference, KL, top-1 agreement, and the seconds each took (emulator speed, not device speed).

The variant comes from --checkpoint's config.json, or the manifest's named variant (gemma3-270m).

CPU figures run the QDQ graph as it says (passes/qdq.py cpu_reference_options: onnxruntime's fused
MatMulNBits in float32); --cpu-int8-matmul keeps onnxruntime's default, which rounds every weight
MatMul's uint16 input to int8 on the fly (an error of the CPU run, not of the graph or the HTP).

Measured on the real Gemma 3 270M, `gemma-export --variant gemma3-270m --target qnn-htp OUT` (max
context 1024, chunk 64; fp32 reference: `gemma-export --variant gemma3-270m --quant fp32 FP32_OUT`),
`--tokens 128 --htp-steps 3`, a shared 2-core machine under load:

                                      QDQ on CPU vs fp32              emulated HTP vs CPU, same graphs
                                      top-1   KL     ppl ratio        top-1  KL     max |logit diff|
  2026-11-24 (Pow/ReduceMean norms,   75.2 %  0.385  1.135 (30.59)    2/4    2.79   27.7   (398 s)
   last @ hidden, CPU int8 MatMul)
  2026-12-01 RMSNormalization norms   82.9 %  0.249  1.090 (29.37)    3/4    0.946  7.54   (54 s)
   (CPU as the graph says)
  2026-12-01 + last row by Mul +      82.9 %  0.249  1.090 (29.37)    3/4    0.161  5.25   (58 s)
   ReduceSum (this version)
  same graphs, --cpu-int8-matmul      88.4 %  0.223  1.080 (29.11)    -

(fp32 perplexity 26.95.) With --tokens 16 --htp-steps 16: HTP vs CPU top-1 14/17, KL 0.110, max abs
logit difference 5.25 (222 s on the emulator, 29 s on the CPU provider); on the same 17 positions
QDQ-on-CPU vs fp32 is KL 0.111: the HTP's own error is now of the size of the quantization error.
Where the rest comes from (bench/npu_divergence.py): the HTP rounds the second operand of a MatMul
of two activations (attention's q.K^T and p.V) to 8 bits and is a few uint16 steps off on the
dynamic MatMul beside that (up to ~6 % of a score tensor's range on one decode step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gemma_export.npu_driver import NpuDriver
from gemma_export.passes.qdq import cpu_reference_options
from gemma_runtime import Model
from gemma_runtime.manifest import read_manifest
from gemma_runtime.session_cache import _create


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _variant(folder: Path, checkpoint: str | None):
    from gemma_export.variants import named_variant, variant_from_config

    if checkpoint:
        from gemma_export.checkpoint import open_checkpoint

        return variant_from_config(open_checkpoint(checkpoint).config)
    name = read_manifest(folder).variant
    return variant_from_config(named_variant(name).config, expected=name)


def _driver(folder: Path, variant) -> NpuDriver:
    return NpuDriver.for_export(folder, variant)


def session_options(provider: str, cpu_int8_matmul: bool = False) -> ort.SessionOptions:
    """One thread (a shared machine); on the CPU provider the QDQ graph computed as it says (float
    between DequantizeLinear and QuantizeLinear; passes/qdq.py cpu_reference_options), unless
    `cpu_int8_matmul` keeps onnxruntime's default int8 activations in its fused MatMulNBits."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if provider == "CPUExecutionProvider" and not cpu_int8_matmul:
        cpu_reference_options(options)
    return options


def _npu_logits(folder: Path, variant, provider: str, prompt, continuation,
                cpu_int8_matmul: bool = False) -> tuple[np.ndarray, float]:
    sessions = {g: _create(folder / f"{g}.onnx", session_options(provider, cpu_int8_matmul), provider)
                for g in ("prefill", "decode")}
    start = time.perf_counter()
    rows = _driver(folder, variant).teacher_forced(lambda g, f: sessions[g].run(None, f), prompt, continuation)
    return np.concatenate(rows), time.perf_counter() - start


def _reference_logits(folder: Path, prompt, continuation) -> np.ndarray:
    model = Model.load(folder, provider="cpu", threads=1)
    chunk = model.manifest.prefill_chunk
    for first in range(0, len(prompt), chunk):
        logits = model._step(np.array(prompt[first:first + chunk]), first, chunk)
    rows, position = [logits], len(prompt)
    for token in continuation:
        rows.append(model._step(np.array([token]), position, chunk))
        position += 1
    return np.concatenate(rows)


def compare(ref: np.ndarray, got: np.ndarray, targets: list[int] | None = None) -> dict:
    lr, lg = _log_softmax(ref), _log_softmax(got)
    out = {"positions": len(ref), "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
           "kl": float((np.exp(lr) * (lr - lg)).sum(-1).mean()), "max_abs_diff": float(np.abs(ref - got).max())}
    if targets is not None:  # row i predicts targets[i]
        idx = np.arange(len(targets))
        ppl_ref, ppl_got = np.exp(-lr[idx, targets].mean()), np.exp(-lg[idx, targets].mean())
        out.update(ppl_reference=float(ppl_ref), ppl=float(ppl_got), ppl_ratio=float(ppl_got / ppl_ref))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npu", type=Path)
    p.add_argument("--reference", type=Path, required=True, help="fp32 export of the same checkpoint")
    p.add_argument("--checkpoint", help="checkpoint folder (for the variant); default: the manifest's named variant")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--htp-steps", type=int, default=4, help="decode steps on the emulated HTP; -1 skips the HTP run")
    p.add_argument("--cpu-int8-matmul", action="store_true",
                   help="run the CPU provider at onnxruntime's default MatMulNBits accuracy (int8 activations)")
    args = p.parse_args()
    from gemma_export.evaluate import cpython_docs_text, encode_text

    variant = _variant(args.npu, args.checkpoint)
    chunk = read_manifest(args.npu).prefill_chunk
    ids = encode_text(args.npu, cpython_docs_text())[: chunk + args.tokens + 1]
    prompt, continuation = ids[:chunk], ids[chunk:chunk + args.tokens]
    qdq, cpu_s = _npu_logits(args.npu, variant, "CPUExecutionProvider", prompt, continuation, args.cpu_int8_matmul)
    ref = _reference_logits(args.reference, prompt, continuation)
    report = {"quality_qdq_cpu_vs_fp32": compare(ref, qdq, ids[chunk:chunk + args.tokens + 1]),
              "qdq_cpu_seconds": round(cpu_s, 2)}
    if args.htp_steps < 0:
        print(json.dumps(report, indent=2))
        return
    steps = continuation[: args.htp_steps]
    htp, htp_s = _npu_logits(args.npu, variant, "QNNExecutionProvider", prompt, steps)
    cpu, cpu_steps_s = _npu_logits(args.npu, variant, "CPUExecutionProvider", prompt, steps, args.cpu_int8_matmul)
    report["htp_vs_cpu_same_graphs"] = {**compare(cpu, htp), "htp_seconds": round(htp_s, 2),
                                        "cpu_seconds": round(cpu_steps_s, 2),
                                        "prompt_tokens": len(prompt), "decode_steps": len(steps)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
