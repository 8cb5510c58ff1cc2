"""Decode/prefill speed and memory of an export against eager transformers on the same weights,
measured in one run (a benchmark, not a test).

    python bench/decode_speed.py OUT [--checkpoint SRC] [--prompt-tokens 128] [--new-tokens 128] [--threads 2]

SRC defaults to the export's recorded source (a folder or .gguf). Prints a table and ratios.
Each side runs in its own subprocess so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OURS = r"""
import json, resource, sys, time, numpy as np
from gemma_runtime import Model
out, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter(); model = Model.load(out, threads=threads); load_s = time.perf_counter() - t
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rng = np.random.default_rng(0)
prompt = [model.manifest.tokens.bos] + rng.integers(1000, 20000, n_prompt - 1).tolist()
model.generate_ids(prompt[:16], max_new_tokens=4)  # warm-up
stop = model.manifest.tokens.stop
ids = model.generate_ids(prompt, max_new_tokens=n_new)
s = model.last_stats
print(json.dumps({"load_s": load_s, "ttft_s": s.time_to_first_token, "prefill_tps": s.prefill_tokens_per_second,
                  "decode_tps": s.decode_tokens_per_second, "new_tokens": len(ids),
                  "rss_after_load": rss_load, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

EAGER = r"""
import json, resource, sys, time, numpy as np, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
src, n_prompt, n_new, threads, bos = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
p = Path(src)
kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
model = AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=torch.float32, **kw).eval()
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
rng = np.random.default_rng(0)
prompt = torch.tensor([[bos] + rng.integers(1000, 20000, n_prompt - 1).tolist()])
with torch.no_grad():
    model.generate(prompt[:, :16], max_new_tokens=4, do_sample=False)
    t = time.perf_counter(); out = model(prompt, use_cache=True); ttft = time.perf_counter() - t
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n_new - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t
print(json.dumps({"ttft_s": ttft, "prefill_tps": n_prompt / ttft, "decode_tps": (n_new - 1) / decode_s,
                  "rss_after_load": rss_load, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, *args) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--checkpoint", help="eager reference weights (default: the export's source)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    manifest = json.loads((args.out / "manifest.json").read_text())
    source = args.checkpoint or manifest["provenance"]["source"]
    weights = sum((args.out / f).stat().st_size for f in manifest["files"] if f.endswith((".data", ".bin")))

    ours = _run(OURS, args.out, args.prompt_tokens, args.new_tokens, args.threads)
    eager = _run(EAGER, source, args.prompt_tokens, args.new_tokens, args.threads, manifest["tokens"]["bos"])
    mib = 2**20
    print(f"export {args.out} ({manifest['family']}, {manifest['quant']}), weights on disk {weights / mib:.0f} MiB, "
          f"{args.threads} threads, prompt {args.prompt_tokens}, new {args.new_tokens}")
    print(f"{'':22}{'ours':>12}{'eager':>12}{'ours/eager':>12}")
    for key, label in [("ttft_s", "time to first token s"), ("prefill_tps", "prefill tokens/s"),
                       ("decode_tps", "decode tokens/s"), ("peak_rss", "peak RSS MiB")]:
        a, b = ours[key], eager[key]
        scale = mib if key == "peak_rss" else 1
        print(f"{label:22}{a / scale:12.2f}{b / scale:12.2f}{a / b:12.2f}")
    print(f"runtime peak RSS / weights on disk: {ours['peak_rss'] / weights:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ours": ours, "eager": eager, "weights_bytes": weights}, indent=2))


if __name__ == "__main__":
    main()
