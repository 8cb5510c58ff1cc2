"""The device side must run without torch, transformers or onnx installed."""

import subprocess
import sys

CODE = """
import sys
for name in ("torch", "transformers", "onnx"):
    sys.modules[name] = None  # any import of them now raises ImportError
import gemma_runtime, gemma_runtime.cli, gemma_runtime.integrity, gemma_runtime.tables
import gemma_runtime.kv_cache, gemma_runtime.detokenize, gemma_runtime.sampling
import gemma_runtime.chat_template, gemma_runtime.prompt_cache, gemma_runtime.providers
import gemma_runtime.session_cache, gemma_runtime.stop_strings, gemma_runtime.generation_config
print(gemma_runtime.__version__)
"""


def test_runtime_imports_without_torch_transformers_onnx():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
