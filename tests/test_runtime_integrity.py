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

    def counting(path):
        calls.append(path.name)
        return real(path)

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
