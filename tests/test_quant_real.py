"""Quality floors of the quantized Gemma 3 270M (the GGUF on PyPI) against its fp32 export.

One fp32 export (~60 s), the int8/int4/fp16 exports derived from it by the same passes as
`gemma-export --quant` (requantize_export, 10-60 s each), then one teacher-forced evaluation over
2048 tokens of CPython's documentation text (pydoc_data.topics, from its first topic on). The int4
recipe is calibrated (importance-weighted block search) on the LAST 2048 tokens of the same text
(evaluate.calibration_ids; the text has ~112k tokens), which no evaluation here reaches. The floors
sit a little below the figures measured when they were set.
"""

from __future__ import annotations

import json
import shutil

import pytest

from gemma_export.evaluate import cpython_docs_text, encode_text, evaluate_ids
from gemma_export.package import calibrate_export, requantize_export
from gemma_export.recipes import RecipeOptions, make_recipe

TOKENS = 2048  # 4096 in bench/quant_quality.py; 2048 keeps this file near 3 minutes on 2 cores
# recipe: (min top-1 agreement, max KL, max perplexity ratio). Measured on these 2048 tokens:
# int8 98.05% / 0.00111 / 0.997, int4 (accuracy level 4, 2026-12-01) 90.97% / 0.0323 / 1.023
# (4096 tokens: int8 98.10% / 0.0011 / 0.998, int4 90.70% / 0.0338 / 1.022, bench/int4_kernels.py).
# Those on an AMD EPYC; on an Intel Xeon with AVX512-VNNI (2026-12-02) int4 scored 90.38% / 0.0308 /
# 1.023: MatMulNBits' int8-activation kernels differ by CPU, so the int4 top-1 floor is the issue's 90%.
# Issue targets: int8 98% / 1.01, int4 90% / 1.05.
FLOORS = {"int8": (0.975, 0.0015, 1.005), "int4": (0.90, 0.036, 1.03),
          # --lm-head 4: the 4-bit head with 512 candidates rescored from the int8 token table (passes/rescore.py);
          # measured 90.72% / 0.0345 / 1.0304 in blocks of 64, 91.11% / 0.0343 / 1.0292 in blocks of 128
          # (recipes.LM_HEAD4_BLOCK, 2026-12-07) (the 4-bit head alone: ~83% / 0.09 / 1.08)
          "int4-lm-head-4": (0.90, 0.037, 1.035)}
RECIPES = {"int8": ("int8", RecipeOptions()), "int4": ("int4", RecipeOptions()),
           "int4-lm-head-4": ("int4", RecipeOptions(lm_head_bits=4)), "fp16": ("fp16", RecipeOptions())}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, real_270m_export):
    root = tmp_path_factory.mktemp("quant-real")
    fp32 = real_270m_export  # the session's one fp32 export (conftest.py)
    out = {"fp32": fp32}
    # both int4 recipes calibrate on the same text: measured once (~25 s on 2 cores)
    calibration = calibrate_export(fp32, make_recipe("int4"))
    for label, (recipe, options) in RECIPES.items():
        made = make_recipe(recipe, options)
        requantize_export(fp32, root / label, made, calibration=calibration if calibration.fits(fp32, made) else None)
        out[label] = root / label
    yield out
    shutil.rmtree(root, ignore_errors=True)  # 2 GB: CI's disk holds every session fixture at once


@pytest.fixture(scope="module")
def scores(exports):
    ids = encode_text(exports["fp32"], cpython_docs_text())[:TOKENS]
    labels = sorted(FLOORS)
    result = evaluate_ids(exports["fp32"], [exports[label] for label in labels], ids)
    return dict(zip(labels, result.candidates))


@pytest.mark.parametrize("recipe", sorted(FLOORS))
def test_quality_floor(scores, recipe):
    top1, kl, ratio = FLOORS[recipe]
    s = scores[recipe]
    print(f"{recipe}: top-1 {s.top1:.4f}, KL {s.kl:.5f}, ppl ratio {s.ppl_ratio:.4f}")
    assert s.tokens == TOKENS
    assert s.top1 >= top1 and s.kl <= kl and s.ppl_ratio <= ratio, s


def test_sizes_shrink(exports):
    size = {k: sum(f.stat().st_size for f in v.iterdir()) for k, v in exports.items()}
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]
    # the tied head's rescoring rows are the token table's own (manifest.table_inputs): a 4-bit head
    # and no second copy of its rows, smaller than the int8 head
    assert size["int4-lm-head-4"] < size["int4"]
    manifest = json.loads((exports["int4-lm-head-4"] / "manifest.json").read_text())
    assert manifest["table_inputs"] == {"lm_head_rows": "embed_tokens.data", "lm_head_row_scales": "embed_tokens.scales"}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp16_greedy_matches_fp32(exports, prompt):
    """float16 weights, float32 arithmetic: the same greedy tokens as the fp32 export."""
    from gemma_runtime import Model

    ref, half = Model.load(exports["fp32"]), Model.load(exports["fp16"])
    ids = ref.encode(prompt)
    assert half.generate_ids(ids, 32) == ref.generate_ids(ids, 32)


def test_int4_is_calibrated_on_text_eval_never_reads(exports):
    """The int4 manifest records its calibration text: the tail of the docs text, far from the
    first TOKENS (and the 4096 of gemma-export eval's default) that the evaluation scores."""

    from gemma_export.evaluate import DEFAULT_MAX_TOKENS, calibration_ids

    record = json.loads((exports["int4"] / "manifest.json").read_text())["provenance"]["quant_recipe"]
    assert record["calibration"] == "cpython-docs-tail" and "last 2048" in record["calibration_text"]
    total = len(encode_text(exports["fp32"], cpython_docs_text()))
    cal, _ = calibration_ids(exports["fp32"])
    assert total - len(cal) >= 4 * max(TOKENS, DEFAULT_MAX_TOKENS)
