"""Engine child: gemma_runtime on an export folder (intra-op threads = spec.threads)."""

import time

import _child
from gemma_runtime import Model

spec = _child.read_spec()
start = time.perf_counter()
model = Model.load(spec.model, threads=spec.threads)
load_s = time.perf_counter() - start
# Fixed-length decode: the same 128 steps for every engine, so no stop id ends a run early
# (the runtime has no public switch for this; only the benchmark clears the set).
model._stop = frozenset()


def generate(prompt, n):
    return model._generate(prompt, n)  # the iterator behind generate_ids: one id per step


_child.report(load_s, _child.measure(spec, generate), engine="ours", provider=model.provider)
