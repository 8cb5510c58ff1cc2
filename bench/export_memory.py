"""Peak memory of `gemma-export` per recipe, against the size of the model's float32 weights.

The decoder is streamed (gemma_export/stream_export.py): the graph is exported with no weight
loaded and each weight is made, quantized and written in turn; host tables are written by row
blocks. Peak RSS should stay near a few copies of the largest tensor, not the model.

    .venv/bin/python bench/export_memory.py --variant gemma3-270m --random-weights --recipes fp32,int4
    .venv/bin/python bench/export_memory.py --variant e2b --random-weights --recipes int4 --runtime   # ~40 min, 2 cores
    .venv/bin/python bench/export_memory.py --runtime-only OUT   # the runtime's figure for an existing export

Measured 2026-12-01, E2B-shaped random weights (float32 weights 18.52 GiB, largest tensor 2.00 GiB):
    int4  (this machine, 2 cores, niced beside other work): export peak RSS 4.04 GiB, 4.53 GiB on
          disk (decoder.data 2.15, per_layer.bin 1.88, embed_tokens.bin 0.50), 2458 s (--rtn: 283 s);
          runtime (bench/full_size_random.py, 128-token prompt + 32 decode steps, max context 4096)
          peak RSS 3.35 GiB (5.03 before the int4 recipe's 8-bit tensors moved to accuracy level 4).
    int8  (the lent 16-core machine, beside the fp32 run): peak RSS 4.13 GiB, 5.14 GiB on disk, 272 s.
    fp16  (the lent 16-core machine): export peak RSS 8.18 GiB, 14.02 GiB on disk, 207 s.
    fp32  (this machine, alone): peak RSS 3.35 GiB, 18.53 GiB on disk, 271 s.

Each export runs in its own process (peak RSS from wait4, the same figure as /usr/bin/time -v).
--runtime also loads each export with gemma_runtime in a child process (2 threads), feeds a
128-token prompt and decodes 32 tokens, and prints that process's peak RSS: host tables are
memory-mapped, so only the rows looked up count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def _float_bytes(variant_name: str) -> tuple[int, int]:
    """(float32 bytes of the decoder weights, of the host tables) of a named variant."""
    from gemma_export.resources import decoder_parameters, largest_weight, table_parameters
    from gemma_export.variants import named_variant, variant_from_config

    variant = variant_from_config(named_variant(variant_name).config, expected=variant_name)
    return decoder_parameters(variant) * 4 + table_parameters(variant) * 4, largest_weight(variant) * 4


def _run(args: list[str]) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS bytes) of one export in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gemma_export.cli", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # kB on Linux


def _run_model(out: Path) -> None:
    """In the child: load, 128-token prompt, 32 greedy steps."""
    import numpy as np
    from gemma_runtime import Model

    model = Model.load(out, threads=2)
    ids = [int(i) for i in np.random.default_rng(0).integers(10, model.manifest.vocab_size, 128)]
    model.generate_ids(ids, max_new_tokens=32)


def _runtime_peak(out: Path) -> tuple[int, float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--run-model", str(out)])
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> int:
    if sys.argv[1:2] == ["--run-model"]:
        _run_model(Path(sys.argv[2]))
        return 0
    if sys.argv[1:2] == ["--runtime-only"]:
        out = Path(sys.argv[2])
        rc, seconds, peak = _runtime_peak(out)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"runtime: peak RSS {peak / GIB:.2f} GiB (export {size / GIB:.2f} GiB), {seconds:.0f} s, exit {rc}")
        return rc
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="gemma3-270m")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--recipes", default="fp32,int4")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--runtime", action="store_true", help="also the runtime's peak RSS for each export")
    ap.add_argument("--out", type=Path, default=None, help="parent folder of the exports (default: a temp dir, removed)")
    a = ap.parse_args()
    weights, largest = _float_bytes(a.variant)
    parent = a.out or Path(tempfile.mkdtemp(prefix="export-memory-"))
    print(f"{a.variant}: float32 weights {weights / GIB:.2f} GiB (largest tensor {largest / GIB:.2f} GiB)")
    print(f"{'recipe':8} {'peak RSS GiB':>12} {'/ weights':>9} {'/ largest':>9} {'out GiB':>8} {'seconds':>8}")
    try:
        for recipe in a.recipes.split(","):
            out = parent / f"{a.variant}-{recipe}"
            args = ["--variant", a.variant, "--quant", recipe, "--max-context", str(a.max_context), "--quiet", str(out)]
            rc, seconds, peak = _run(args + (["--random-weights"] if a.random_weights else []))
            size = sum(p.stat().st_size for p in out.iterdir()) if rc == 0 else 0
            print(f"{recipe:8} {peak / GIB:12.2f} {peak / weights:9.2f} {peak / largest:9.2f} {size / GIB:8.2f} {seconds:8.0f}"
                  + ("" if rc == 0 else f"  (exit {rc})"), flush=True)
            if a.runtime and rc == 0:
                rc, seconds, peak = _runtime_peak(out)
                print(f"{'':8} runtime (128 prompt + 32 decode): peak RSS {peak / GIB:.2f} GiB, {seconds:.0f} s"
                      + ("" if rc == 0 else f"  (exit {rc})"), flush=True)
    finally:
        if a.out is None:
            shutil.rmtree(parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
