"""Load time of a qnn-htp export on the qnn provider with and without the EP-context cache (a
benchmark, not a test; onnxruntime-qnn's HTP backend, an emulator on x86-64).

    .venv/bin/python bench/qnn_context_load.py OUT [--threads 1] [--repeat 2] [--encoders audio,vision]

Each load runs in a fresh process against a fresh cache folder: plain (the HTP compiles both
graphs), graph_cache=True with an empty cache (compiles, then saves the EP contexts), and
graph_cache=True again (opens the saved contexts). Prints the seconds of each, the ratio of the
cached load to the plain one, and the contexts' size on disk.

Measured 2026-12-02 on the real Gemma 3 270M (`gemma-export --variant gemma3-270m --target qnn-htp
OUT`: 93 s, 1187 MiB), 1 thread, onnxruntime 1.32 + onnxruntime-qnn 2.7.0 on this 2-core machine:
plain 13.74 s, first cached load (compiles, saves) 15.12 s, cached 0.59 s (0.043x of plain, 23x
faster); the two graphs' contexts take 521 MiB on disk.

--encoders: after the decoder graphs, each load also opens the named encoder sessions of a
multimodal qnn-htp export (what the first image / clip pays; graph_cache keeps their EP contexts
too), timed one by one after the decoder graphs' load (whose figures stay the load alone).

Measured 2026-12-02 on the tiny multimodal Gemma 3n (tests/multimodal_checkpoint.py's checkpoint:
tiny text and audio towers, the full-size MobileNetV5 vision tower; `gemma-export --checkpoint CKPT
--target qnn-htp --max-context 512 --prefill-chunk 32 OUT`), `--encoders audio,vision --repeat 1`
run twice, 1 thread, the same versions and machine (shared: load average ~2 throughout):
    decoder graphs  plain 1.79 / 1.30 s, compile and save 1.35 / 1.04 s, cached 0.05 / 0.05 s
    audio encoder   plain 3.85 / 4.17 s, compile and save 4.32 / 4.14 s, cached 0.01 / 0.01 s (4.6 MiB)
    vision encoder  plain 85.9 / 78.1 s, compile and save 82.0 / 80.2 s, cached 0.36 / 0.39 s (306 MiB)
The cached encoders give the plain sessions' rows bit for bit (tests/test_npu_encoders.py).
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
row = {"load_s": time.perf_counter() - start, "source": model.session_source}
for kind in filter(None, sys.argv[4].split(",")):  # the encoder sessions, as a first image / clip opens them
    start = time.perf_counter()
    model._media._session(kind)
    graph = {"image": "vision", "audio": "audio"}[kind]
    row[kind] = {"load_s": time.perf_counter() - start, "source": model.encoder_sources[graph]}
print(json.dumps(row))
"""

_KINDS = {"vision": "image", "audio": "audio"}


def _load(out: str, threads: int, cached: bool, cache: Path, encoders: tuple[str, ...] = ()) -> dict:
    env = {**__import__("os").environ, "GEMMA_RUNTIME_CACHE_DIR": str(cache)}
    kinds = ",".join(_KINDS[e] for e in encoders)
    done = subprocess.run([sys.executable, "-c", _CHILD, out, str(threads), "1" if cached else "0", kinds],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"load failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sizes_by_graph(root: Path) -> dict[str, float]:
    """MiB of each cache entry, by the file name of the graph it was compiled from (its done marker)."""
    sizes = {}
    for entry in root.iterdir():
        if (entry / "done").is_file():
            name = Path(json.loads((entry / "done").read_text())["source"]).name
            sizes[name] = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / 2**20
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--encoders", default="", help="comma-separated: audio, vision (multimodal exports)")
    args = ap.parse_args()
    encoders = tuple(e for e in args.encoders.split(",") if e)
    unknown = sorted(set(encoders) - set(_KINDS))
    if unknown:
        ap.error(f"--encoders: unknown {', '.join(unknown)} (audio, vision)")
    rows = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            plain = _load(args.out, args.threads, False, cache, encoders)
            first = _load(args.out, args.threads, True, cache, encoders)
            again = _load(args.out, args.threads, True, cache, encoders)
            size = sum(f.stat().st_size for f in (cache / "contexts").rglob("*") if f.is_file())
            sizes = _sizes_by_graph(cache / "contexts")
        row = {"plain_s": plain["load_s"], "compile_and_save_s": first["load_s"], "cached_s": again["load_s"],
               "cached_source": again["source"], "contexts_mib": size / 2**20}
        for e in encoders:
            kind = _KINDS[e]
            row[e] = {"plain_s": plain[kind]["load_s"], "compile_and_save_s": first[kind]["load_s"],
                      "cached_s": again[kind]["load_s"], "cached_source": again[kind]["source"],
                      "context_mib": sizes.get(f"{e}.onnx", 0.0)}
        rows.append(row)
    for r in rows:
        for name, f in [("decoder graphs", r), *((e, r[e]) for e in encoders)]:
            print(f"{name}: plain {f['plain_s']:.2f} s | first cached load (compiles, saves) {f['compile_and_save_s']:.2f} s | "
                  f"cached {f['cached_s']:.2f} s ({f['cached_source']}) | cached / plain {f['cached_s'] / f['plain_s']:.3f}"
                  + (f" | context {f['context_mib']:.1f} MiB" if "context_mib" in f else ""))
        print(f"contexts {r['contexts_mib']:.1f} MiB (all graphs)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
