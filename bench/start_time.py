"""Cold and warm start of an export: Model.load + the first token (a benchmark, not a test).

    python bench/start_time.py OUT [--threads N]

Each start runs in a fresh process with its own GEMMA_RUNTIME_CACHE_DIR state:
  cold: empty runtime cache (every file hashed, graph optimized from the .onnx)
  warm: the checksums remembered (no hashing)
  warm + graph cache: checksums remembered and onnxruntime's optimized graph loaded from the cache
The OS page cache is not dropped (that needs root): "cold" means the runtime's own caches.
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
