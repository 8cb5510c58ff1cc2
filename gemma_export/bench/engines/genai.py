"""Engine child: onnxruntime-genai (og.Model / og.Generator) on a genai model folder, run with the
Python of the environment where onnxruntime_genai is installed. Intra-op threads = spec.threads,
set through a copy of genai_config.json in a temporary folder whose other files link to the
originals. Greedy; min_length = prompt + new ids, so that no end-of-sequence id ends a run early."""

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import _child
import onnxruntime_genai as og

spec = _child.read_spec()
source = Path(spec.model)
config = json.loads((source / "genai_config.json").read_text())
# GroupQueryAttention with a sliding window wants a KV buffer of at least the window (genai sizes
# its buffer by max_length); the runs stop themselves after n ids.
window = (config["model"]["decoder"].get("sliding_window") or {}).get("window_size", 0)
options = config["model"]["decoder"].setdefault("session_options", {})
options["intra_op_num_threads"] = spec.threads
options["inter_op_num_threads"] = 1
folder = Path(tempfile.mkdtemp(prefix="genai-bench-"))
atexit.register(shutil.rmtree, folder, True)
for f in source.iterdir():
    if f.name != "genai_config.json":
        os.symlink(f.resolve(), folder / f.name)
(folder / "genai_config.json").write_text(json.dumps(config))
start = time.perf_counter()
model = og.Model(str(folder))
load_s = time.perf_counter() - start


def generate(prompt, n):
    params = og.GeneratorParams(model)
    total = len(prompt) + n
    params.set_search_options(do_sample=False, max_length=max(total, window), min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # the prefill
    for _ in range(n):
        if generator.is_done():
            return
        generator.generate_next_token()  # runs the previous token (if any) and picks the next one
        yield int(generator.get_next_tokens()[0])


_child.report(load_s, _child.measure(spec, generate), engine="genai", onnxruntime_genai=og.__version__)
