"""Hugging Face hub downloads for ``--checkpoint owner/name``.

Export never needs the network when a checkpoint path is given; this path exists for users who
pass a hub id. Offline (``HF_HUB_OFFLINE=1``, or the hub's host cannot be reached within a few
seconds) it uses a snapshot already in the local Hugging Face cache, if there is one, and
otherwise fails at once with a message saying to pass a downloaded folder.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import CheckpointError

__all__ = ["ALLOW_PATTERNS", "download", "hub_reachable", "looks_like_hub_id"]

# What an export reads: configs, safetensors weights, tokenizer files, chat templates.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]

# Seconds to wait for a TCP connection to the hub (or the proxy) before calling it unreachable.
PROBE_TIMEOUT_S = 4.0

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = {"1", "true", "yes", "on"}


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` (one slash, hub-legal characters, not a .gguf file name)."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(".gguf") and ".." not in text


def _offline_env() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _probe_target() -> tuple[str, int]:
    """The host:port a download connects to first: the proxy when one is set, else the hub."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(var)
        if proxy:
            u = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if u.hostname:
                return u.hostname, u.port or (443 if u.scheme == "https" else 80)
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    u = urlparse(endpoint)
    return u.hostname or "huggingface.co", u.port or (80 if u.scheme == "http" else 443)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub (or the proxy) opens within ``timeout`` seconds.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    host, port = _probe_target()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True, name="hub-probe")
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _unreachable(repo_id: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot download {repo_id!r}: the Hugging Face hub cannot be reached ({why}) and no copy is in "
        "the local Hugging Face cache. Download the checkpoint folder on a machine with network access "
        "(e.g. `hf download " + repo_id + " --local-dir DIR`) and pass `--checkpoint DIR`."
    )


def _from_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
        )
    except Exception:  # noqa: BLE001 - any failure means: not usable from the cache
        return None


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) the files an export needs; return the snapshot folder."""
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local path, and huggingface_hub is not installed to download it; "
            "pass --checkpoint PATH with a downloaded folder"
        ) from None

    if _offline_env():
        cached = _from_cache(repo_id, revision)
        if cached is not None:
            return cached
        raise _unreachable(repo_id, "HF_HUB_OFFLINE is set")
    if not hub_reachable():
        cached = _from_cache(repo_id, revision)
        if cached is not None:
            return cached
        host, port = _probe_target()
        raise _unreachable(repo_id, f"no connection to {host}:{port}")

    licence = (
        f"access to {repo_id!r} was refused: accept the model's licence on its hub page "
        f"(https://huggingface.co/{repo_id}) while logged in, then set HF_TOKEN to an access token "
        "of that account (or run `hf auth login`)"
    )
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except hf_errors.GatedRepoError:
        raise CheckpointError(licence) from None
    except hf_errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r}: no such local file or folder, and no such model on the Hugging Face hub "
            "(if it is private, set HF_TOKEN to a token that can read it)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id!r} has no revision {revision!r} on the Hugging Face hub") from None
    except hf_errors.LocalEntryNotFoundError as e:  # connection failed mid-way and nothing cached
        raise _unreachable(repo_id, str(e).splitlines()[0][:200]) from None
    except hf_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise CheckpointError(licence) from None
        raise CheckpointError(f"downloading {repo_id!r} from the Hugging Face hub failed: {e}") from None
    except OSError as e:
        raise CheckpointError(f"downloading {repo_id!r} from the Hugging Face hub failed: {e}") from None
