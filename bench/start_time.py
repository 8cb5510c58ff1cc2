"""Cold and warm start of an export: Model.load + the first token (a benchmark, not a test).

    python bench/start_time.py OUT [--threads N]

Each start runs in a fresh process with its own GEMMA_RUNTIME_CACHE_DIR state:
  cold: empty runtime cache (every file hashed, graph optimized from the .onnx)
  warm: the checksums remembered (no hashing)
  warm + graph cache: checksums remembered and onnxruntime's optimized graph loaded from the cache
The OS page cache is not dropped (that needs root): "cold" means the runtime's own caches.

Measured 2026-12-01 (gemma3-270m fp32 export, /work/cache/real270m-fp32, 1.7 GiB of files; --threads 2,
onnxruntime 1.32.0, a shared 2-core machine at load average 7.5-7.7, so wall times are inflated):

    cold (nothing cached):           load 6.69 s, first token at 7.06 s (graph)
    warm (checksums cached):         load 2.78 s, first token at 3.09 s (graph)
    warm again:                      load 2.65 s, first token at 3.06 s (graph)
    graph cache, first (saves it):   load 8.13 s, first token at 8.35 s (graph, optimized graph saved)
    graph cache, warm:               load 2.81 s, first token at 3.01 s (cached optimized graph)
    graph cache, warm again:         load 2.23 s, first token at 2.41 s (cached optimized graph)

Remembered checksums save ~4 s of hashing; the optimized-graph cache costs ~1.4 s to save and is
within this machine's noise of the plain warm start (2.2-2.8 s vs 2.7-2.8 s load), so it stays off by
default.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from gemma_runtime import Model
model = Model.load(sys.argv[1], threads=int(sys.argv[2]) if sys.argv[2] != "0" else None, graph_cache=sys.argv[3] == "1")
t1 = time.perf_counter()
model.generate_ids([model.manifest.tokens.bos, 651], max_new_tokens=1)
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t0:.2f} {model.session_source}")
"""


def start(out: str, threads: int, cache: str, graph_cache: bool) -> str:
    env = {**os.environ, "GEMMA_RUNTIME_CACHE_DIR": cache}
    proc = subprocess.run([sys.executable, "-c", CHILD, out, str(threads), "1" if graph_cache else "0"],
                          env=env, capture_output=True, text=True, check=True)
    load, first, source = proc.stdout.split(maxsplit=2)
    return f"load {load} s, first token at {first} s ({source.strip()})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        print("cold (nothing cached):          ", start(args.out, args.threads, a, False))
        print("warm (checksums cached):        ", start(args.out, args.threads, a, False))
        print("warm again:                     ", start(args.out, args.threads, a, False))
        print("graph cache, first (saves it):  ", start(args.out, args.threads, b, True))
        print("graph cache, warm:              ", start(args.out, args.threads, b, True))
        print("graph cache, warm again:        ", start(args.out, args.threads, b, True))


if __name__ == "__main__":
    main()
