"""The tiny qnn-htp exports that tests/test_qnn.py and tests/test_runtime_npu.py share: one export
per family per session (a QDQ export takes 10-20 s on 2 cores). Both modules' `npu_export` fixtures
hand out the folders cached here, keyed by the session's `tiny` root."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import MAX_CONTEXT, PREFILL_CHUNK

_MADE: dict[tuple[Path, str], tuple[Path, Path]] = {}


def npu_export(tiny, tmp_path_factory, family: str) -> tuple[Path, Path]:
    """(qnn-htp export folder, folder of its float prefill/decode graphs) of a tiny checkpoint."""
    key = (tiny.root, family)
    if key not in _MADE:
        from gemma_export.npu_export import write_npu_export
        from gemma_export.plan import ExportRequest, make_plan
        from gemma_export.progress import Progress

        root = tmp_path_factory.mktemp("npu")
        plan = make_plan(ExportRequest(checkpoint=str(tiny.checkpoint(family)), target="qnn-htp",
                                       max_context=MAX_CONTEXT, prefill_chunk=PREFILL_CHUNK))
        write_npu_export(plan, root / "out", Progress(enabled=False), keep_float=root / "float")
        _MADE[key] = root / "out", root / "float"
    return _MADE[key]


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over the rows of two logits arrays."""
    lp = p_logits - p_logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = q_logits - q_logits.max(-1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
