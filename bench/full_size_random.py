"""Full-size export with random weights (e.g. E2B), for a machine with the memory for it:
export time and peak RSS, runtime RSS, prefill/decode speed, and parity of the runtime against the
eager transformers model loaded with the same random weights.

    python bench/full_size_random.py --variant e2b --work /tmp/full [--prompt-tokens 600] [--steps 8]

Not a test: it needs tens of GB of memory and disk (E2B fp32: ~20 GB written, ~35 GB peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _export(variant: str, out: Path, max_context: int) -> dict:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, resource; from gemma_export.cli import main; rc = main(sys.argv[1:]); "
         "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024); sys.exit(rc)",
         "--variant", variant, "--random-weights", "--max-context", str(max_context), "--quiet", str(out)],
        capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"export failed:\n{proc.stderr[-4000:]}")
    peak = int(proc.stdout.split("PEAK")[-1].strip())
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"export_s": time.perf_counter() - t, "export_peak_rss": peak, "out_bytes": size, "log": proc.stdout[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="e2b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/full"))
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import numpy as np

    out = args.work / args.variant
    report = {"variant": args.variant}
    report.update(_export(args.variant, out, args.max_context))
    print(json.dumps(report), flush=True)

    from gemma_runtime import Model

    t = time.perf_counter()
    model = Model.load(out, threads=args.threads)
    report["load_s"] = time.perf_counter() - t
    report["runtime_rss_after_load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = np.random.default_rng(0)
    prompt = [2] + rng.integers(10, 20000, args.prompt_tokens - 1).tolist()
    # teacher-forced logits of the runtime: prefill, then `steps` decode steps on greedy tokens
    model._cache.reset()
    chunk = model.manifest.prefill_chunk
    t = time.perf_counter()
    for first in range(0, len(prompt), chunk):
        logits = model._step(np.asarray(prompt[first:first + chunk]), first, chunk)
    report["prefill_tps"] = len(prompt) / (time.perf_counter() - t)
    ours, tokens = [logits.copy()], []
    t = time.perf_counter()
    for i in range(args.steps):
        tokens.append(int(ours[-1].argmax()))
        ours.append(model._step(np.asarray(tokens[-1:]), len(prompt) + i, 1).copy())
    report["decode_tps"] = args.steps / (time.perf_counter() - t)
    report["runtime_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report), flush=True)
    del model
    import gc

    gc.collect()

    import torch
    import transformers

    from gemma_export.variants import named_variant, variant_from_config
    from gemma_export.weights import RandomTensors

    config = named_variant(args.variant).config
    variant = variant_from_config(config, expected=args.variant)
    cls = getattr(transformers, config["architectures"][0])
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    ref = cls(hf_config)  # random init, overwritten below (meta would leave rope buffers empty)
    tensors = RandomTensors(variant)
    state = {n: tensors.get(n) for n in tensors.names()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    del state
    ref.tie_weights()
    report["ref_missing"], report["ref_unexpected"] = missing, unexpected
    ref.eval()
    full = torch.tensor([prompt + tokens])
    with torch.no_grad():
        ref_logits = ref(full).logits[0, len(prompt) - 1:].float().numpy()
    diffs = [float(np.abs(a[0] - b).max()) for a, b in zip(ours, ref_logits)]
    scale = max(1.0, float(np.abs(ref_logits).max()))
    report["max_abs_diff"] = max(diffs)
    report["threshold"] = 1e-4 * scale
    report["greedy_identical"] = [int(a[0].argmax()) for a in ours] == [int(b.argmax()) for b in ref_logits]
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
