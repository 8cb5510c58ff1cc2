"""Sizes on disk and peak RSS per quantization recipe for a full-size random-weights export, and
the runtime's RSS and speed on each (for a machine with the memory for it; E2B fp32 needs ~30 GB).

    python bench/full_size_quant.py --variant e2b --work /tmp/fq [--recipes int8 int4] [--threads N]

The fp32 export is made once (gemma-export --random-weights); each recipe is derived from it with
requantize_export (the same passes as `gemma-export --quant`), each step in its own process so its
peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_PEAK = "import resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"

EXPORT = """import sys
from gemma_export.cli import main
rc = main(sys.argv[1:])
""" + _PEAK

REQUANT = """import sys
from pathlib import Path
from gemma_export.package import requantize_export
from gemma_export.recipes import make_recipe
requantize_export(Path(sys.argv[1]), Path(sys.argv[2]), make_recipe(sys.argv[3]))
""" + _PEAK

RUN = """import sys, time, json, resource, numpy as np
from gemma_runtime import Model
threads = int(sys.argv[2]) if sys.argv[2] != "0" else None
t = time.perf_counter(); m = Model.load(sys.argv[1], threads=threads); load = time.perf_counter() - t
rng = np.random.default_rng(0)
ids = m.generate_ids([2] + rng.integers(10, 20000, 127).tolist(), max_new_tokens=32)
s = m.last_stats
print(json.dumps({"load_s": load, "prefill_tps": s.prefill_tokens_per_second, "decode_tps": s.decode_tokens_per_second,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, *args: str) -> tuple[str, float]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"step failed ({' '.join(args)}):\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t


def _peak(stdout: str) -> int:
    return int(stdout.split("PEAK")[-1].strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="e2b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fq"))
    ap.add_argument("--recipes", nargs="+", default=["int8", "int4"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-fp32-run", action="store_true", help="do not run the runtime on the fp32 export")
    args = ap.parse_args()
    fp32 = args.work / f"{args.variant}-fp32"
    rows = {}
    out, secs = _run(EXPORT, "--variant", args.variant, "--random-weights", "--quiet", str(fp32))
    rows["fp32"] = {"seconds": secs, "peak_rss": _peak(out)}
    for recipe in args.recipes:
        dest = args.work / f"{args.variant}-{recipe}"
        out, secs = _run(REQUANT, str(fp32), str(dest), recipe)
        rows[recipe] = {"seconds": secs, "peak_rss": _peak(out)}
    for recipe, row in rows.items():
        folder = args.work / f"{args.variant}-{recipe}"
        row["disk_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
        if recipe == "fp32" and args.skip_fp32_run:
            row["runtime"] = {"load_s": 0, "prefill_tps": 0, "decode_tps": 0, "peak_rss": 0}
        else:
            out, _ = _run(RUN, str(folder), str(args.threads))
            row["runtime"] = json.loads(out.strip().splitlines()[-1])
        print(recipe, json.dumps(row), flush=True)
    gib = 2**30
    print(f"{'recipe':8}{'make s':>9}{'make peak GiB':>15}{'disk GiB':>10}{'run peak GiB':>14}{'prefill t/s':>13}{'decode t/s':>12}")
    for recipe, r in rows.items():
        rt = r["runtime"]
        print(f"{recipe:8}{r['seconds']:9.0f}{r['peak_rss'] / gib:15.1f}{r['disk_bytes'] / gib:10.2f}"
              f"{rt['peak_rss'] / gib:14.2f}{rt['prefill_tps']:13.1f}{rt['decode_tps']:12.1f}")


if __name__ == "__main__":
    main()
