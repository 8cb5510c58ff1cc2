"""Which engines run, with which Python and on which model file; each decision is a plain
record (an engine that cannot run says why, and the benchmark prints it and goes on)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("ours", "eager", "genai", "llama")
LABELS = {"ours": "ours", "eager": "eager fp32", "genai": "ort-genai", "llama": "llama.cpp"}
SCRIPTS = Path(__file__).parent / "engines"
# onnxruntime-genai and llama-cpp-python pin onnxruntime/numpy versions of their own, so on the
# project's machines they live in virtual environments of their own; these are tried in order
# after the current interpreter when no --genai-python / --llama-python is given.
DEFAULT_PYTHONS = {
    "genai": ("/work/venvs/genai/bin/python",),
    "llama": ("/work/venvs/llama/bin/python", "/work/venvs/genai/bin/python"),
}
MODULES = {"genai": "onnxruntime_genai", "llama": "llama_cpp"}


@dataclass(frozen=True)
class EngineSetup:
    name: str
    python: str | None
    model: str | None
    skipped: str | None = None  # why the engine does not run (None: it runs)

    @property
    def script(self) -> Path:
        return SCRIPTS / f"{self.name}.py"


def _imports(python: str, module: str) -> bool:
    done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120)
    return done.returncode == 0


def find_python(engine: str, given: str | None) -> tuple[str | None, str]:
    """(python, note): the given interpreter (it must import the engine), else the first of the
    current one and DEFAULT_PYTHONS that does."""
    module = MODULES[engine]
    if given:
        if not Path(given).exists():
            return None, f"--{engine}-python {given} does not exist"
        if not _imports(given, module):
            return None, f"{given} cannot import {module}"
        return given, ""
    for candidate in (sys.executable, *DEFAULT_PYTHONS[engine]):
        if Path(candidate).exists() and _imports(candidate, module):
            return candidate, ""
    tried = ", ".join((sys.executable, *DEFAULT_PYTHONS[engine]))
    return None, f"{module} is not installed (tried {tried}; give --{engine}-python)"


def setup_engine(engine: str, model: Path | None, python: str | None, missing_model: str) -> EngineSetup:
    if model is None:
        return EngineSetup(engine, None, None, missing_model)
    if not model.exists():
        return EngineSetup(engine, None, str(model), f"{model} does not exist")
    if engine in MODULES:
        python, note = find_python(engine, python)
        if python is None:
            return EngineSetup(engine, None, str(model), note)
    return EngineSetup(engine, python or sys.executable, str(model))
