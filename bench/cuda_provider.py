"""The cuda target on onnxruntime's CUDA provider (a benchmark for a machine with an NVIDIA GPU and
onnxruntime-gpu; this repository's CI has neither).

    python bench/cuda_provider.py [--work DIR] [--families gemma,gemma3_sw8,gemma3_sw24,gemma3n]
        [--quants fp32,fp16,int4] [--speed gemma3-270m] [--speed-quants int4,fp16] [--json REPORT]

1. Per tiny family of tests/checkpoints.py and per --quants: `gemma-export --target cuda --quant Q`
   (max context 64, chunk 8, as the tests export), then
   - placement: `gemma-export check`'s count of nodes per provider of a CUDA session, and which op
     types onnxruntime left on the CPU;
   - the runtime on cuda (`Model.load(provider="cuda")`, no fallback warning) against the same
     graphs on the CPU provider: logits max |diff| and top-1 agreement over the prefill and 32
     decode steps, both fed the CUDA run's greedy ids (tests/checkpoints.runtime_logits), and
     whether each provider's own greedy tokens are equal. int4/int8 graphs at accuracy level 4
     differ by design: the CPU kernel rounds their activations to int8, CUDA's computes in float;
   - fp32 only: against the eager transformers model with test_parity's budget, 1e-4 * max|logits|.
2. --speed VARIANT (random weights): `gemma-export --variant VARIANT --random-weights --target cuda
   --quant Q`, then prefill tokens/s (a 128- and a 1024-token prompt) and decode tokens/s (128 new
   tokens) on the CUDA provider and on the CPU provider (all cores) in the same run, as a ratio.

Prints a table per part; --json writes every figure.

Measured 2026-12-02 on the lent machine (one NVIDIA H200, driver 580.159.04, 16 cores; onnxruntime-gpu
1.31.1, a CUDA 13 build, carried there as a wheel; torch's CUDA 13 libraries on LD_LIBRARY_PATH):

  placement: every decoder graph on CUDA but 6 shape nodes (Concat x3, Mul, Reshape, Squeeze)
    that onnxruntime keeps on the CPU by its own choice; no session failed, no fallback warning.
  same ids, CUDA vs the CPU provider (prefill + 32 decode steps; max |logit diff| / |logits| max):
               fp32                 fp16                 int4 (top-1 agreement)
    gemma      7.8e-06 / 3.51       8.3e-06 / 3.50       0.30 / 4.13 (91 %)
    gemma3_sw8 2.7e-06 / 3.81       2.7e-06 / 3.81       0.098 / 3.65 (97 %)
    gemma3_sw24 1.4e-06 / 3.28      1.8e-06 / 3.28       0.060 / 3.41 (100 %)
    gemma3n    1.5e-05 / 3.20       2.2e-05 / 3.20       0.34 / 3.44 (85 %)
  fp32 vs eager transformers: 9.3e-06, 2.8e-06, 1.8e-06 (budgets 3.5e-04, 3.8e-04, 3.3e-04);
    Gemma 3n's eager reference did not run there (transformers 5.17 indexes ids past the per-layer
    vocabulary; the tests' 5.24 does not). int4 differs by the CPU kernel's int8 activations:
    exported at accuracy level 0 the same prefill agreed to 1.9e-06 (the int8 recipe to 1.5e-06).
  Gemma 3 270M-shaped random weights, 128 new tokens, tokens/s (CPU provider: 16 cores):
                         prefill 128   prefill 1024   decode after 128   after 1024
    int4  cuda           4938          11894          77.7               76.7
          cpu            1168           1359          110.7              108.8   (cuda 0.70x)
    fp16  cuda           4729          13712          74.9               72.8
          cpu            1255           1540          60.7               69.1    (cuda 1.24x / 1.05x)
  --multimodal (the tiny Gemma 3n with the full-size MobileNetV5 tower, a 640x480 random image, a
  3 s clip): every vision node (int4: 3073, fp16: 2758) and audio node (333, 329) on CUDA; the
  encoders' rows on CUDA vs the CPU provider max |diff| 5.7e-06 (image, |rows| 3.4) and 1.2e-06
  (audio), cosine 1.000000; greedy tokens of a prompt with both equal on CUDA and the CPU. (The
  encoder seconds it prints include creating the session on first use: not a speed figure.)
  An earlier run with TF32 on gave fp16 decode 127 / 126 tokens/s on cuda (int4 70 / 74). Decode
  on CUDA is bound by the host: the runtime's KV cache lives in host memory, so every step copies
  the whole cache (41 MiB at 4096 positions) to the device and back, and binds every input again.
  A device-resident cache (OrtValues on the GPU bound in place) is not built yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny checkpoints

NEW_TOKENS = 32


def export(args: list[str]) -> None:
    from gemma_export.cli import main

    rc = main([*args, "--quiet"])
    if rc != 0:
        raise SystemExit(f"gemma-export {' '.join(args)} failed (exit {rc})")


def placement(out: Path, target: str = "cuda", provider: str = "cuda") -> dict:
    """Per graph: nodes per provider of a `provider` session (`gemma-export check`), the op types left
    to other providers, and check's problems (a failed session names its error)."""
    from gemma_export.check import check_export

    report = check_export(out, target=target, providers=(provider,))
    return {"problems": list(report.problems),
            **{g.name: {p.provider: {"nodes": dict(p.nodes), "off": dict(p.off_provider), "error": p.error}
                        for p in g.placements} for g in report.graphs}}


def parity(work: Path, families: list[str], quants: list[str], gpu_provider: str = "cuda", target: str = "cuda") -> list[dict]:
    import torch

    from checkpoints import PROMPT_LEN, build, prompt_ids, reference, runtime_logits
    from gemma_runtime import Model

    rows = []
    for family in families:
        checkpoint = build(family, work / "checkpoints" / family)
        eager = None
        for quant in quants:
            out = work / "exports" / f"{target}-{family}-{quant}"
            if not out.exists():
                export(["--checkpoint", str(checkpoint), "--target", target, "--quant", quant,
                        "--max-context", "64", "--prefill-chunk", "8", str(out)])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                gpu = Model.load(out, provider=gpu_provider)
            cpu = Model.load(out, provider="cpu")
            prompt = prompt_ids()
            t = time.perf_counter()
            ours, tokens = runtime_logits(gpu, prompt, NEW_TOKENS)
            gpu_s = time.perf_counter() - t
            _, cpu_tokens = runtime_logits(cpu, prompt, NEW_TOKENS)
            theirs = forced_logits(cpu, prompt, tokens)  # the same ids: a token that differs does not compound
            row = {"family": family, "quant": quant, "provider": gpu.provider,
                   "warnings": [str(w.message) for w in caught],
                   "max_abs_diff_vs_cpu": float(np.abs(ours - theirs).max()),
                   "logits_abs_max": float(np.abs(theirs).max()),
                   "top1_agreement_vs_cpu": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
                   "tokens_equal_cpu": tokens == cpu_tokens, "gpu_seconds": gpu_s,
                   "placement": placement(out, target, gpu_provider)}
            if quant == "fp32":
                eager = eager or reference(family, checkpoint)
                try:
                    with torch.no_grad():
                        full = eager(torch.tensor([prompt + tokens])).logits[0].float().numpy()
                except IndexError as err:  # older transformers: Gemma 3n ids past the per-layer vocabulary
                    row["eager_error"] = f"transformers: {err}"
                    rows.append(row)
                    print(_parity_line(row), flush=True)
                    continue
                expected = full[PROMPT_LEN - 1:PROMPT_LEN + NEW_TOKENS]
                diff = float(np.abs(ours - expected).max())
                scale = max(1.0, float(np.abs(expected).max()))
                row.update(max_abs_diff_vs_eager=diff, eager_budget=1e-4 * scale, within_budget=diff <= 1e-4 * scale)
            rows.append(row)
            print(_parity_line(row), flush=True)
    return rows


def forced_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """runtime_logits' steps with the decode ids given: [len(tokens) + 1, V]."""
    from checkpoints import teacher_forced_logits

    return teacher_forced_logits(model, prompt + tokens, len(prompt))


def _parity_line(row: dict) -> str:
    line = (f"{row['family']:>12} {row['quant']:>5} on {row['provider']}: vs cpu (same ids) max|diff| "
            f"{row['max_abs_diff_vs_cpu']:.3g} (|logits| {row['logits_abs_max']:.3g}), top-1 "
            f"{row['top1_agreement_vs_cpu']:.0%}, greedy tokens equal {row['tokens_equal_cpu']}")
    if "max_abs_diff_vs_eager" in row:
        line += f"; vs eager {row['max_abs_diff_vs_eager']:.3g} (budget {row['eager_budget']:.3g}) {'ok' if row['within_budget'] else 'OVER'}"
    for name, g in row["placement"].items():
        line += f"\n{'':>14}{name}: {g}"
    if "eager_error" in row:
        line += f"; eager reference failed ({row['eager_error']})"
    if row["warnings"]:
        line += f"\n{'':>14}warnings: {row['warnings']}"
    return line


def multimodal(work: Path, quant: str, gpu_provider: str = "cuda", target: str = "cuda") -> dict:
    """The tiny multimodal Gemma 3n of the tests (tests/multimodal_checkpoint.py: full-size
    MobileNetV5 vision tower, tiny audio tower), `--target cuda --quant QUANT`: placement of every
    graph, and each encoder's rows on cuda against the CPU provider's on the same graphs, for one
    synthetic image and one synthetic clip; then greedy tokens of a prompt with both."""
    import json as _json

    import multimodal_checkpoint as mm
    from gemma_runtime import Model

    ckpt = work / "checkpoints" / "multimodal"
    if not (ckpt / "config.json").exists():
        mm.build_model().save_pretrained(ckpt)
        (ckpt / "preprocessor_config.json").write_text(_json.dumps({
            "image_processor_type": "SiglipImageProcessorFast", "do_convert_rgb": None, "do_normalize": False,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 768, "width": 768}}))
        mm.write_tokenizer(ckpt / "tokenizer.json")
    out = work / "exports" / f"{target}-multimodal-{quant}"
    if not out.exists():
        t = time.perf_counter()
        export(["--checkpoint", str(ckpt), "--target", target, "--quant", quant, "--max-context", "512",
                "--prefill-chunk", "32", str(out)])
        print(f"exported the tiny multimodal Gemma 3n ({quant}) in {time.perf_counter() - t:.0f} s", flush=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    clip = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 3) / 16000) + 0.05 * rng.standard_normal(16000 * 3)).astype(np.float32)
    row = {"quant": quant, "placement": placement(out, target, gpu_provider)}
    models = {p: Model.load(out, provider=p) for p in (gpu_provider, "cpu")}
    for kind, run in (("image", lambda m: m._media.encode_image(image)), ("audio", lambda m: m._media.encode_audio((clip, 16000)))):
        t = time.perf_counter()
        gpu = run(models[gpu_provider])
        gpu_s = time.perf_counter() - t
        t = time.perf_counter()
        cpu = run(models["cpu"])
        cpu_s = time.perf_counter() - t
        cos = (gpu * cpu).sum(-1) / (np.linalg.norm(gpu, axis=-1) * np.linalg.norm(cpu, axis=-1))
        row[kind] = {"rows": list(gpu.shape), "max_abs_diff": float(np.abs(gpu - cpu).max()), "abs_max": float(np.abs(cpu).max()),
                     "cosine_min": float(cos.min()), "gpu_seconds": gpu_s, "cpu_seconds": cpu_s}
        print(f"multimodal {quant} {kind}: {gpu.shape} rows, {gpu_provider} vs cpu max|diff| {row[kind]['max_abs_diff']:.3g} "
              f"(|rows| {row[kind]['abs_max']:.3g}), cosine min {row[kind]['cosine_min']:.6f}; {gpu_s:.2f} s vs {cpu_s:.2f} s", flush=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "audio", "audio": (clip, 16000)},
                                             {"type": "text", "text": "what"}]}]
    tokens = {p: list(mod.generate_ids(mod.chat_ids(messages), max_new_tokens=8, images=[image], audio=[(clip, 16000)]))
              for p, mod in models.items()}
    row["greedy_tokens_equal"] = tokens[gpu_provider] == tokens["cpu"]
    print(f"multimodal {quant}: greedy tokens with an image and a clip equal on {gpu_provider} and cpu: {row['greedy_tokens_equal']}"
          f"\n{'':>14}placement: {row['placement']}", flush=True)
    return row


def speed(work: Path, variant: str, quants: list[str], gpu_provider: str = "cuda", prompts=(128, 1024),
          new_tokens: int = 128, target: str = "cuda") -> list[dict]:
    from gemma_runtime import Model

    rows = []
    rng = np.random.default_rng(0)
    for quant in quants:
        out = work / "exports" / f"{target}-{variant}-{quant}"
        if not out.exists():
            t = time.perf_counter()
            export(["--variant", variant, "--random-weights", "--target", target, "--quant", quant, str(out)])
            print(f"exported {variant} {quant} in {time.perf_counter() - t:.0f} s", flush=True)
        for provider in dict.fromkeys((gpu_provider, "cpu")):
            model = Model.load(out, provider=provider)
            for n in prompts:
                ids = rng.integers(3, model.manifest.vocab_size, size=n).tolist()
                for _ in model.generate_ids(ids, max_new_tokens=8):  # warm-up: kernels, arena
                    pass
                for _ in model.generate_ids(ids, max_new_tokens=new_tokens):
                    pass
                s = model.last_stats
                row = {"variant": variant, "quant": quant, "provider": model.provider, "prompt": n,
                       "prefill_tps": s.prefill_tokens_per_second, "decode_tps": s.decode_tokens_per_second,
                       "decoded": s.decode_tokens}
                rows.append(row)
                print(f"{variant} {quant} {model.provider:>22} prompt {n:>5}: prefill {row['prefill_tps']:8.1f} t/s, "
                      f"decode {row['decode_tps']:7.1f} t/s ({s.decode_tokens} tokens)", flush=True)
            del model
    from gemma_runtime.providers import PROVIDERS

    by = {(r["quant"], r["provider"], r["prompt"]): r for r in rows}
    for quant in quants:
        for n in prompts:
            g, c = by.get((quant, PROVIDERS[gpu_provider].ort_name, n)), by.get((quant, "CPUExecutionProvider", n))
            if g and c and g is not c:
                print(f"{variant} {quant} prompt {n}: {gpu_provider} / cpu prefill {g['prefill_tps'] / c['prefill_tps']:.2f}x, "
                      f"decode {g['decode_tps'] / c['decode_tps']:.2f}x")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cuda-provider")
    p.add_argument("--families", default="gemma,gemma3_sw8,gemma3_sw24,gemma3n")
    p.add_argument("--quants", default="fp32,fp16,int4")
    p.add_argument("--speed", default="gemma3-270m", help="variant for the speed part ('' skips it)")
    p.add_argument("--speed-quants", default="int4,fp16")
    p.add_argument("--multimodal", default="int4", help="quant of the tiny multimodal export ('' skips it)")
    p.add_argument("--json", type=Path)
    p.add_argument("--gpu-provider", default="cuda", help="cpu: a dry run of this script where no GPU is")
    a = p.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    if a.gpu_provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu on a machine with an NVIDIA GPU")
    report = {"onnxruntime": ort.__version__}
    if a.families:
        report["parity"] = parity(a.work, a.families.split(","), a.quants.split(","), a.gpu_provider)
    if a.multimodal:
        report["multimodal"] = multimodal(a.work, a.multimodal, a.gpu_provider)
    if a.speed:
        report["speed"] = speed(a.work, a.speed, a.speed_quants.split(","), a.gpu_provider)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
