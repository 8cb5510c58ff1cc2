"""Check every file of an export folder against the sha256 the manifest lists for it.

Hashing costs seconds per GB on a small device, so a successful check is remembered in a
JSON cache outside the export folder (the folder may be read-only, and a cache inside it
could be copied along with a broken file). An entry is trusted only while the file's size,
st_mtime_ns and st_ctime_ns are unchanged: ctime cannot be set back by a user, so even a
same-size rewrite whose mtime was restored is re-hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError
from .load_pages import drop_cached_pages

CACHE_ENV = "GEMMA_RUNTIME_CACHE_DIR"
CACHE_FILE = "verified.json"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "gemma_runtime"


def sha256_file(path: Path, drop_cache: bool = False) -> str:
    """The file's sha256 as lowercase hex (module-level so tests can count calls). `drop_cache`:
    the file's pages leave the page cache afterwards (load_pages.drop_cached_pages)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if drop_cache:
            drop_cached_pages(f.fileno())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Stamp:
    """What must stay the same for a remembered check to still hold."""

    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str

    @classmethod
    def of(cls, st: os.stat_result, sha256: str) -> "_Stamp":
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha256.lower())


def _resolve(folder: Path, name: str) -> Path:
    # A manifest must not point outside its folder (e.g. "../../etc/passwd"); symlinks inside
    # the folder are fine (a user may keep a large data file on another disk).
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise IntegrityError(f"manifest lists {name!r}, which is not a file inside the export folder {folder}")
    return folder.absolute() / rel


def _load_cache(cache_path: Path) -> dict[str, dict]:
    try:
        raw = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no cache or a damaged one: just hash again
    return raw if isinstance(raw, dict) else {}


def _save_cache(cache_path: Path, entries: dict[str, dict]) -> None:
    # Best effort: a read-only home must not stop the model from running.
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=".verified-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, cache_path)
    except OSError:
        pass


def verify_files(folder: str | os.PathLike, files: Mapping[str, str], cache_dir: str | os.PathLike | None = None,
                 drop_cache: Collection[str] = ()) -> None:
    """Raise IntegrityError unless every listed file exists and has its listed sha256. The files
    named in `drop_cache` (host tables) leave the page cache after their hash (load_pages.drop_cached_pages)."""
    folder = Path(folder)
    cache_path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / CACHE_FILE
    cache = _load_cache(cache_path)
    changed = False
    for name, expected in files.items():
        path = _resolve(folder, name)
        try:
            st = path.stat()
        except OSError:
            raise IntegrityError(
                f"{name} is missing from {folder}: re-export the model or copy the whole folder again"
            ) from None
        if not path.is_file():
            raise IntegrityError(f"{name} in {folder} is not a regular file: re-export or copy the folder again")
        key = str(path)
        stamp = _Stamp.of(st, expected)
        if cache.get(key) == stamp.__dict__:
            continue
        actual = sha256_file(path, drop_cache=name in drop_cache)
        if actual != expected.lower():
            cache.pop(key, None)
            _save_cache(cache_path, cache)
            raise IntegrityError(
                f"{name} in {folder} does not match the manifest (sha256 {actual[:12]}..., expected "
                f"{expected[:12]}..., {st.st_size} bytes): the file is truncated or changed; "
                f"re-export the model or copy the folder again"
            )
        cache[key] = stamp.__dict__
        changed = True
    if changed:
        _save_cache(cache_path, cache)
