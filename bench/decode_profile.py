"""Where decode time goes: host (Python/numpy) vs onnxruntime, and which ops inside the graph
(a benchmark, not a test).

    python bench/decode_profile.py OUT [--threads 2] [--prompt-tokens 128] [--new-tokens 128]
                                       [--loop binding|feeds|both] [--repeat N] [--ort-profile] [--json PATH]

--loop feeds runs the plain session.run loop (feed dict in, fresh outputs out) instead of the
default IOBinding loop; --loop both alternates the two over one session, for a before/after
ratio under the same machine load. Session time is the wall time inside
InferenceSession.run / run_with_iobinding; host time is the rest of the decode clock (embedding
lookup, cache writes, sampling, bookkeeping). --ort-profile reruns the generation on a second
session with onnxruntime's profiler on and sums kernel time by op type over the decode runs
(every run after the first, which is the prompt's one prefill chunk). For Python-level sampling:
    py-spy record -r 250 -f raw -o decode.txt -- python bench/decode_profile.py OUT

Measured 2026-11-24 on gemma3-270m (2 threads, on a shared, overloaded 2-core machine: wall
times are inflated, the ratios within one run are the figures to read):
- host time (lookup, cache writes, argmax) is < 1% of a decode step in either loop; IOBinding
  cuts it (fp32: 4.7 -> 2.6 ms/step) and decode speed moves by 1.01x (fp32) to 1.09x (int4
  with fast kernels): the step is the graph.
- the int4 recipe's graph hits onnxruntime's dequantize-everything fallbacks: 8-bit
  MatMulNBits at accuracy_level 0 (the LM head: a 640 MiB fp32 temp per step) and float
  zero points on the 4-bit ones. CPU per decode step, 1 thread: 1570 ms as exported, 195 ms
  with accuracy_level 4, 34 ms with accuracy_level 4 and no float zero points.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gemma_runtime import Model
from gemma_runtime.session_cache import open_session


class _RunTimer:
    """Records the wall time of every InferenceSession.run / run_with_iobinding call, and the
    process CPU time (all threads) at the end of each."""

    def __init__(self):
        self.durations: list[float] = []
        self.cpu_at_end: list[float] = []
        for name in ("run", "run_with_iobinding"):
            setattr(ort.InferenceSession, name, self._wrap(getattr(ort.InferenceSession, name)))

    def _wrap(self, original):
        def timed(session, *args, **kwargs):
            t = time.perf_counter()
            try:
                return original(session, *args, **kwargs)
            finally:
                self.durations.append(time.perf_counter() - t)
                self.cpu_at_end.append(time.process_time())
        return timed


def _rss_mib() -> dict[str, float]:
    """Resident memory now (not the peak), MiB: anonymous (heap: prepacked weights, arena,
    buffers) and file-backed (memory-mapped weights and host-table rows, reclaimable)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
    return {"rss": kib["VmRSS"] / 1024, "anon": kib["RssAnon"] / 1024, "file": kib["RssFile"] / 1024}


def _op_breakdown(trace: Path) -> dict:
    events = json.loads(trace.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) < 2:
        raise SystemExit(f"{trace}: fewer than two runs recorded")
    decode_start = runs[1]["ts"]  # run 0 is the prefill chunk
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= decode_start:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    steps = len(runs) - 1
    return {
        "decode_runs": steps,
        "model_run_ms_per_step": sum(r["dur"] for r in runs[1:]) / steps / 1e3,
        "kernel_ms_per_step": sum(by_op.values()) / steps / 1e3,
        "ops_ms_per_step": {k: round(v / steps / 1e3, 4) for k, v in by_op.most_common()},
    }


def _measure(model: Model, prompt: list[int], new_tokens: int, timer: _RunTimer) -> dict:
    timer.durations.clear()
    timer.cpu_at_end.clear()
    model.generate_ids(prompt, max_new_tokens=new_tokens)
    cpu_decode = time.process_time() - timer.cpu_at_end[0]  # from the end of the prefill run
    s = model.last_stats
    steps = max(s.decode_tokens, 1)
    session_s = sum(timer.durations[1:])  # run 0 is the prefill
    return {
        "decode_tps": s.decode_tokens_per_second,
        "ms_per_step": s.decode_seconds / steps * 1e3,
        "session_ms_per_step": session_s / steps * 1e3,
        "host_ms_per_step": (s.decode_seconds - session_s) / steps * 1e3,
        "host_share": (s.decode_seconds - session_s) / s.decode_seconds,
        # CPU time of all threads per step: steadier than wall time on a shared machine
        # (onnxruntime's spinning threads count too)
        "cpu_ms_per_step": cpu_decode / steps * 1e3,
        "prefill_tps": s.prefill_tokens_per_second,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--loop", choices=("binding", "feeds", "both"), default="binding")
    ap.add_argument("--repeat", type=int, default=1, help="timed generations per loop; the fastest is reported")
    ap.add_argument("--ort-profile", action="store_true")
    ap.add_argument("--keep-trace", action="store_true", help="keep onnxruntime's trace file (a temp folder)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    timer = _RunTimer()
    loops = ("binding", "feeds") if args.loop == "both" else (args.loop,)
    first = Model.load(args.out, threads=args.threads, io_binding=loops[0] == "binding")
    rss_load = _rss_mib()
    # --loop both: the second Model runs the other loop over the same session (same weights in
    # memory), and the two alternate, so both see the same machine load.
    models = {loops[0]: first}
    for loop in loops[1:]:
        models[loop] = Model(first.folder, first.manifest, first._session, first._embed, first._per_layer,
                             first.provider, io_binding=loop == "binding",
                             table_inputs=tuple(first._table_inputs.items()))
    rss_models = _rss_mib()
    rng = np.random.default_rng(0)
    prompt = [first.manifest.tokens.bos] + rng.integers(1000, 20000, args.prompt_tokens - 1).tolist()
    if args.prompt_tokens > first.manifest.prefill_chunk:
        raise SystemExit("--prompt-tokens must fit one prefill chunk (run 0 is taken as the prefill)")
    for model in models.values():
        model.generate_ids(prompt[:16], max_new_tokens=4)  # warm-up
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for loop, model in models.items():
            row = _measure(model, prompt, args.new_tokens, timer)
            if loop not in best or row["decode_tps"] > best[loop]["decode_tps"]:
                best[loop] = row
    weights = sum((args.out / f).stat().st_size for f in first.manifest.files if f.endswith(".data"))
    # One session serves prefill (T=chunk) and decode (T=1): the weights are in memory once, so
    # RSS after generating stays near RSS after load (the host table is memory-mapped rows).
    result = {"threads": args.threads, **best,
              "graph_weights_mib": weights / 2**20, "rss_after_load_mib": rss_load,
              "rss_after_all_models_mib": rss_models,
              "rss_after_generate_mib": _rss_mib(),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if len(best) == 2:
        result["binding/feeds decode_tps"] = best["binding"]["decode_tps"] / best["feeds"]["decode_tps"]
        result["binding/feeds cpu_ms_per_step"] = best["binding"]["cpu_ms_per_step"] / best["feeds"]["cpu_ms_per_step"]
    if args.ort_profile:
        graph = first.manifest.graphs["decoder"]
        scratch = tempfile.mkdtemp(prefix="decode_profile-")
        session, _ = open_session(args.out / graph.file, first.provider, args.threads,
                                  profile=os.path.join(scratch, "ort"))
        profiled = Model(first.folder, first.manifest, session, first._embed, first._per_layer, first.provider,
                         io_binding=loops[0] == "binding", table_inputs=tuple(first._table_inputs.items()))
        del models, first, model
        profiled.generate_ids(prompt, max_new_tokens=args.new_tokens)
        trace = Path(session.end_profiling())
        result["ort_profile"] = _op_breakdown(trace)
        if args.keep_trace:
            result["ort_profile"]["trace"] = str(trace)
        else:
            shutil.rmtree(scratch)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
