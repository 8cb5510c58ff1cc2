"""Load time of a qnn-htp export on the qnn provider with and without the EP-context cache (a
benchmark, not a test; onnxruntime-qnn's HTP backend, an emulator on x86-64).

    .venv/bin/python bench/qnn_context_load.py OUT [--threads 1] [--repeat 2]

Each load runs in a fresh process against a fresh cache folder: plain (the HTP compiles both
graphs), graph_cache=True with an empty cache (compiles, then saves the EP contexts), and
graph_cache=True again (opens the saved contexts). Prints the seconds of each, the ratio of the
cached load to the plain one, and the contexts' size on disk.

Measured 2026-12-02 on the real Gemma 3 270M (`gemma-export --variant gemma3-270m --target qnn-htp
OUT`: 93 s, 1187 MiB), 1 thread, onnxruntime 1.32 + onnxruntime-qnn 2.7.0 on this 2-core machine:
plain 13.74 s, first cached load (compiles, saves) 15.12 s, cached 0.59 s (0.043x of plain, 23x
faster); the two graphs' contexts take 521 MiB on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time
from gemma_runtime.npu_decoder import NpuModel
start = time.perf_counter()
model = NpuModel.load(sys.argv[1], provider="qnn", threads=int(sys.argv[2]), graph_cache=sys.argv[3] == "1")
print(json.dumps({"load_s": time.perf_counter() - start, "source": model.session_source}))
"""


def _load(out: str, threads: int, cached: bool, cache: Path) -> dict:
    env = {**__import__("os").environ, "GEMMA_RUNTIME_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", _CHILD, out, str(threads), "1" if cached else "0"],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            plain = _load(args.out, args.threads, False, cache)
            first = _load(args.out, args.threads, True, cache)
            again = _load(args.out, args.threads, True, cache)
            size = sum(f.stat().st_size for f in (cache / "contexts").rglob("*") if f.is_file())
        rows.append({"plain_s": plain["load_s"], "compile_and_save_s": first["load_s"], "cached_s": again["load_s"],
                     "cached_source": again["source"], "contexts_mib": size / 2**20})
    for r in rows:
        print(f"plain {r['plain_s']:.2f} s | first cached load (compiles, saves) {r['compile_and_save_s']:.2f} s | "
              f"cached {r['cached_s']:.2f} s ({r['cached_source']}) | cached / plain {r['cached_s'] / r['plain_s']:.3f} | "
              f"contexts {r['contexts_mib']:.1f} MiB")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
