"""The weights' pages that only onnxruntime's load read leave the resident set (load_pages.py).

Measured from /proc/self/smaps: the resident KiB of this process's mappings of a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gemma_runtime import load_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if fields and "-" in fields[0] and len(fields) >= 5:
                inside = len(fields) == 6 and fields[5].rstrip("\n") == target
            elif inside and fields[:1] == ["Rss:"]:
                total += int(fields[1])
    return total


def test_clean_private_pages_leave_and_read_back_unchanged(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    path = tmp_path / "weights.data"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # private and writable, as onnxruntime maps it
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page read
    assert resident_kib(path) >= 8 << 10
    assert load_pages.release(path) == 8 << 20
    assert resident_kib(path) == 0
    assert np.array_equal(mapped, data)  # read back from the file
    del mapped


def test_a_mapping_with_a_written_page_is_left_alone(tmp_path):
    path = tmp_path / "weights.data"
    np.zeros(1 << 20, dtype=np.uint8).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    assert int(mapped.sum()) == 0  # read it all in
    mapped[4096] = 7  # a private copy of one page: discarding it would lose the 7
    assert load_pages.release(path) == 0
    assert mapped[4096] == 7 and resident_kib(path) > 0
    assert load_pages.release(None) is None


_LOAD_AND_MEASURE = """
import json, sys
from pathlib import Path
import gemma_runtime.model as model_module
import gemma_runtime.session_cache as session_cache
from gemma_runtime import Model
sys.path.insert(0, sys.argv[3])
from test_runtime_load_pages import resident_kib, status_mib
folder, route = Path(sys.argv[1]), sys.argv[2]
if route == "onnxruntime-maps":  # as before load_pages.py: onnxruntime maps the file, nothing advised
    session_cache.OwnMappedWeights.of = classmethod(lambda cls, path: None)
    model_module.release_load_pages = lambda path: None
model = Model.load(folder, threads=1)
row = {"own_map": hasattr(model._session, "_gemma_own_mapped_weights"), "after_load": status_mib()}
data = folder / model.manifest.graphs["decoder"].data_file
row["tokens"] = model.generate_ids(model.encode("The capital of France is"), max_new_tokens=8)
row["after_run"] = status_mib()
row["data_resident_mib"] = resident_kib(data) / 1024
print(json.dumps(row))
"""


def status_mib() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def _measure(folder: Path, route: str) -> dict:
    run = subprocess.run([sys.executable, "-c", _LOAD_AND_MEASURE, str(folder), route, str(Path(__file__).parent)],
                         stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_real_export_loads_without_holding_the_weights_twice(real_270m_export, record_property):
    """Gemma 3 270M fp32, each route in a process of its own: with the weights over the runtime's
    own map (pages dropped while onnxruntime prepacks them) the load's peak is lower than with
    onnxruntime's own mapping, no page of the weights file stays resident, and the tokens are the
    same."""
    own, plain = _measure(real_270m_export, "own-map"), _measure(real_270m_export, "onnxruntime-maps")
    record_property("own_map", own)
    record_property("onnxruntime_maps", plain)
    assert own["own_map"] and not plain["own_map"]
    assert own["tokens"] == plain["tokens"]
    # measured 1356-1613 against 1730-1739 MiB (2026-12-02, 1-2 threads): the fp32 LM head's 640 MiB
    # bounds what the release can do, since its prepacking reads every page of it in each column
    # panel (on E2B-shaped int4 weights: 2.11 against 2.40 GiB, bench/full_size_random.py)
    assert own["after_load"]["VmHWM"] < plain["after_load"]["VmHWM"], (own, plain)
    assert own["data_resident_mib"] < 16, own


def test_host_table_pages_leave_and_lookups_stay_the_same(tiny):
    """HostTableReader.release_pages (the decode loop drops the tables' pages after each prefill
    chunk and every few steps): no page stays resident, the rows read back are the same."""
    from gemma_runtime.manifest import read_manifest
    from gemma_runtime.tables import HostTableReader

    folder = tiny.export("gemma3n")
    manifest = read_manifest(folder)
    spec = manifest.tables["per_layer"]
    table = HostTableReader.open(folder, "per_layer", spec)
    ids = np.arange(0, spec.shape[0], 7)
    before = table.lookup(ids).copy()
    assert resident_kib(folder / spec.file) > 0
    table.release_pages()
    assert resident_kib(folder / spec.file) == 0
    np.testing.assert_array_equal(table.lookup(ids), before)
