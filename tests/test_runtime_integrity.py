"""File verification and its cache: a changed file is always caught, an unchanged one is hashed once."""

import hashlib
import json
import os

import pytest

from gemma_runtime import integrity
from gemma_runtime.errors import IntegrityError


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {}
    for name, data in {"decoder.onnx": b"graph" * 100, "decoder.data": os.urandom(4096)}.items():
        (out / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    return out, files, tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch):
    calls = []
    real = integrity.sha256_file

    def counting(path, drop_cache=False):
        calls.append(path.name)
        return real(path, drop_cache)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


def test_cache_hit_avoids_rehash(folder, hash_calls):
    out, files, cache = folder
    integrity.verify_files(out, files, cache)
    assert sorted(hash_calls) == sorted(files)
    integrity.verify_files(out, files, cache)
    assert len(hash_calls) == len(files)  # second check: nothing hashed
    entries = json.loads((cache / integrity.CACHE_FILE).read_text())
    assert str(out.absolute() / "decoder.data") in entries


def test_cache_dir_from_environment(folder, monkeypatch, hash_calls):
    out, files, cache = folder
    monkeypatch.setenv(integrity.CACHE_ENV, str(cache / "env"))
    integrity.verify_files(out, files)
    assert (cache / "env" / integrity.CACHE_FILE).is_file()
    integrity.verify_files(out, files)
    assert len(hash_calls) == len(files)


def test_changed_file_caught_after_a_cached_success(folder, hash_calls):
    out, files, cache = folder
    integrity.verify_files(out, files, cache)
    path = out / "decoder.data"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, and the mtime is put back: only the ctime betrays it
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="decoder.data.*re-export"):
        integrity.verify_files(out, files, cache)
    # and it stays caught (the failed file is not remembered as good)
    with pytest.raises(IntegrityError):
        integrity.verify_files(out, files, cache)


def test_truncated_file(folder):
    out, files, cache = folder
    with open(out / "decoder.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(IntegrityError, match="decoder.data.*truncated or changed"):
        integrity.verify_files(out, files, cache)


def test_missing_file(folder):
    out, files, cache = folder
    (out / "decoder.onnx").unlink()
    with pytest.raises(IntegrityError, match="decoder.onnx is missing.*copy the whole folder again"):
        integrity.verify_files(out, files, cache)


def test_wrong_expected_hash_is_not_served_from_cache(folder):
    out, files, cache = folder
    integrity.verify_files(out, files, cache)
    other = {**files, "decoder.onnx": "0" * 64}  # a new manifest over the same file
    with pytest.raises(IntegrityError, match="decoder.onnx"):
        integrity.verify_files(out, other, cache)


def test_names_outside_the_folder_are_refused(folder):
    out, files, cache = folder
    with pytest.raises(IntegrityError, match="not a file inside"):
        integrity.verify_files(out, {"../secret": "0" * 64}, cache)


def test_corrupt_or_unwritable_cache_is_not_fatal(folder, hash_calls):
    out, files, cache = folder
    cache.mkdir()
    (cache / integrity.CACHE_FILE).write_text("{not json")
    integrity.verify_files(out, files, cache)
    blocker = cache / "blocked"
    blocker.write_text("a file where a folder should be")
    integrity.verify_files(out, files, blocker)  # cannot write the cache: still verifies
    assert len(hash_calls) == 2 * len(files)



def _resident_pages(path) -> int:
    """Pages of the file in the page cache (mincore over a map of it)."""
    import ctypes
    import mmap

    import numpy as np

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        vec = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(mm, dtype=np.uint8)  # its address, without touching a page
        assert libc.mincore(view.ctypes.data, size, vec) == 0, ctypes.get_errno()
        del view
        return sum(v & 1 for v in vec)


def test_a_host_table_leaves_the_page_cache_after_its_hash(tmp_path):
    """A file named in drop_cache (the host tables: Model.load names them) is evicted from the page
    cache once hashed, so its rows come back a page at a time through the runtime's map, not in
    the large folios a plain read leaves (which Linux maps whole into the process on a fault).
    The other files stay cached."""
    out = tmp_path / "out"
    out.mkdir()
    files = {}
    for name in ("embed_tokens.bin", "decoder.data"):
        data = os.urandom(4 << 20)
        (out / name).write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
    for name in files:
        (out / name).read_bytes()
    before = {name: _resident_pages(out / name) for name in files}
    if not all(before.values()):
        pytest.skip(f"{tmp_path} keeps no page cache for written files ({before})")
    integrity.verify_files(out, files, tmp_path / "cache", drop_cache={"embed_tokens.bin"})
    assert _resident_pages(out / "embed_tokens.bin") == 0
    assert _resident_pages(out / "decoder.data") == before["decoder.data"] > 0


@pytest.mark.parametrize("family", ["gemma", "gemma3n"])  # gemma3n: two tables
def test_model_load_drops_only_the_host_tables_from_the_page_cache(tiny, monkeypatch, tmp_path, family):
    from gemma_runtime import Model
    from gemma_runtime.manifest import read_manifest

    out = tiny.export(family)
    dropped = {}
    real = integrity.sha256_file

    def recording(path, drop_cache=False):
        dropped[path.name] = drop_cache
        return real(path, drop_cache)

    monkeypatch.setattr(integrity, "sha256_file", recording)
    monkeypatch.setenv(integrity.CACHE_ENV, str(tmp_path / "cache"))  # nothing verified yet: every file hashed
    Model.load(out)
    tables = {t.file for t in read_manifest(out).tables.values()}
    assert tables and set(dropped) == set(read_manifest(out).files)
    assert {name for name, drop in dropped.items() if drop} == tables
