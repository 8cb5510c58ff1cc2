"""Run one engine child and turn its report into figures: each child runs in its own process (its
peak RSS is its own), on the same prompt ids, and the parent adds what each decode step must read
(streamed.py) and the bound that the measured bandwidth puts on it (bandwidth.py)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .bandwidth import KvLayer, bound_tokens_per_second, mean_kv_bytes
from .engines_setup import LABELS, EngineSetup

CHILD_TIMEOUT_S = 3600


def run_child(setup: EngineSetup, prompts: list[list[int]], new_tokens: int, threads: int, repeat: int,
              timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """The child's JSON report; raises RuntimeError with the end of its stderr when it fails."""
    spec = {"model": setup.model, "prompts": prompts, "new_tokens": new_tokens, "threads": threads, "repeat": repeat}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    label = LABELS[setup.name]
    try:
        child = subprocess.Popen([setup.python, str(setup.script), f.name], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        # the child's progress lines shown as they come; the last ones kept for a failure's note
        tail: collections.deque = collections.deque(maxlen=40)
        echo = threading.Thread(target=_echo, args=(child.stderr, label, tail), daemon=True)
        echo.start()
        timed_out = threading.Event()
        timer = threading.Timer(timeout_s, lambda: (timed_out.set(), child.kill()))
        timer.start()
        try:
            stdout = child.stdout.read()
            child.wait()
        finally:
            timer.cancel()
        echo.join()
        if timed_out.is_set():
            raise RuntimeError(f"no answer in {timeout_s:.0f} s (--timeout)")
    finally:
        os.unlink(f.name)
    lines = stdout.strip().splitlines()
    if child.returncode or not lines:
        raise RuntimeError(f"exit {child.returncode}: {''.join(tail).strip()[-2000:]}")
    return json.loads(lines[-1])


def _echo(stream, label: str, tail: collections.deque) -> None:
    for line in stream:
        tail.append(line)
        print(f"  [{label}] {line}", end="", file=sys.stderr, flush=True)


def add_bounds(report: dict, weight_bytes: int, kv_layers: list[KvLayer], kv_element_bytes: int,
               bandwidth: float) -> dict:
    """Per run: bytes one decode step reads (weights + KV at the run's mean context), the
    bandwidth bound in tokens/s and the measured decode speed as a fraction of it."""
    runs = []
    for r in report["runs"]:
        kv = mean_kv_bytes(kv_layers, r["prompt_tokens"], r["new_tokens"], kv_element_bytes)
        per_token = weight_bytes + kv
        bound = bound_tokens_per_second(bandwidth, per_token)
        runs.append({**r, "kv_bytes_per_token": kv, "bytes_per_token": per_token, "bound_tps": bound,
                     "fraction_of_bound": r["decode_tps"] / bound})
    return {**report, "weight_bytes_per_token": weight_bytes, "kv_element_bytes": kv_element_bytes, "runs": runs}


def agreement(ours: list[int], other: list[int]) -> int:
    """How many leading greedy ids two engines share (same weights and prompt: they should
    agree for a while; quantized weights part sooner)."""
    n = 0
    for a, b in zip(ours, other):
        if a != b:
            break
        n += 1
    return n


def engine_record(setup: EngineSetup, status: str, note: str = "", report: dict | None = None) -> dict:
    return {"engine": setup.name, "label": LABELS[setup.name], "status": status, "note": note,
            "python": setup.python, "model": setup.model, **(report or {})}
