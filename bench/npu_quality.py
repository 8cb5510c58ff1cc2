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

Measured (2026-11-24, real Gemma 3 270M, `gemma-export --variant gemma3-270m --target qnn-htp`:
max context 1024, chunk 64; --tokens 128 --htp-steps 3; a shared 2-core machine under load):
QDQ on the CPU provider vs fp32: top-1 75.2 %, KL 0.385, perplexity 30.59 vs 26.95 (ratio 1.135).
Emulated HTP vs CPU on the same QDQ graphs (64-token prompt + 3 steps): top-1 2/4, KL 2.79, max abs
logit difference 27.7: the HTP's integer arithmetic does NOT yet agree with the CPU run on the real
model (it does on the tiny ones: KL <= 0.004); 398 s on the emulator vs 3.5 s on the CPU provider.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gemma_export.npu_driver import NpuDriver
from gemma_runtime import Model
from gemma_runtime.manifest import read_manifest
from gemma_runtime.session_cache import _create
from gemma_runtime.tables import HostTableReader


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
    m = read_manifest(folder)
    embed = HostTableReader.open(folder, "embed_tokens", m.tables["embed_tokens"])
    per_layer = None
    if m.per_layer_inputs is not None:
        per_layer = HostTableReader.open(folder, "per_layer", m.tables["per_layer"], row0_from=m.per_layer_inputs.vocab_size)
    return NpuDriver(variant, m.max_context, m.prefill_chunk, embed.lookup, per_layer.lookup if per_layer else None)


def _npu_logits(folder: Path, variant, provider: str, prompt, continuation) -> tuple[np.ndarray, float]:
    sessions = {g: _create(folder / f"{g}.onnx", ort.SessionOptions(), provider) for g in ("prefill", "decode")}
    start = time.perf_counter()
    rows = _driver(folder, variant).teacher_forced(lambda g, f: sessions[g].run(None, f), prompt, continuation)
    return np.concatenate(rows), time.perf_counter() - start


def _reference_logits(folder: Path, prompt, continuation) -> np.ndarray:
    model = Model.load(folder, provider="cpu")
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
    args = p.parse_args()
    from gemma_export.evaluate import cpython_docs_text, encode_text

    variant = _variant(args.npu, args.checkpoint)
    chunk = read_manifest(args.npu).prefill_chunk
    ids = encode_text(args.npu, cpython_docs_text())[: chunk + args.tokens + 1]
    prompt, continuation = ids[:chunk], ids[chunk:chunk + args.tokens]
    qdq, cpu_s = _npu_logits(args.npu, variant, "CPUExecutionProvider", prompt, continuation)
    ref = _reference_logits(args.reference, prompt, continuation)
    report = {"quality_qdq_cpu_vs_fp32": compare(ref, qdq, ids[chunk:chunk + args.tokens + 1]),
              "qdq_cpu_seconds": round(cpu_s, 2)}
    if args.htp_steps < 0:
        print(json.dumps(report, indent=2))
        return
    steps = continuation[: args.htp_steps]
    htp, htp_s = _npu_logits(args.npu, variant, "QNNExecutionProvider", prompt, steps)
    cpu, cpu_steps_s = _npu_logits(args.npu, variant, "CPUExecutionProvider", prompt, steps)
    report["htp_vs_cpu_same_graphs"] = {**compare(cpu, htp), "htp_seconds": round(htp_s, 2),
                                        "cpu_seconds": round(cpu_steps_s, 2),
                                        "prompt_tokens": len(prompt), "decode_steps": len(steps)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
