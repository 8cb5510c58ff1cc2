"""Engine child: llama.cpp through llama-cpp-python on a GGUF file (n_threads = n_threads_batch =
spec.threads). Greedy (temperature 0); Llama.generate never stops on its own, so every run makes
exactly the requested ids. reset() before each run: no prompt-prefix reuse between runs."""

import time

import _child
import llama_cpp

spec = _child.read_spec()
context = max(len(p) for p in spec.prompts) + spec.new_tokens + 8
start = time.perf_counter()
llm = llama_cpp.Llama(model_path=spec.model, n_ctx=context, n_threads=spec.threads, n_threads_batch=spec.threads,
                      n_batch=512, verbose=False)
load_s = time.perf_counter() - start


def generate(prompt, n):
    llm.reset()
    for i, token in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=False)):
        yield int(token)
        if i + 1 == n:
            return


_child.report(load_s, _child.measure(spec, generate), engine="llama.cpp", llama_cpp_python=llama_cpp.__version__,
              n_batch=512)
