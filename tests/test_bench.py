"""gemma-export bench: its pure parts (what a decode step reads, the bandwidth bound, ratios,
argument checks). No timings here: the benchmark itself is `gemma-export bench OUT ...`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gemma_export.bench.bandwidth import KvLayer, bound_tokens_per_second, kv_bytes_per_step, mean_kv_bytes
from gemma_export.bench.report import format_table, goal_results, ratio
from gemma_export.bench.run import add_bounds, agreement
from gemma_export.bench.streamed import (Streamed, gguf_streamed, gguf_streamed_sizes, onnx_kv_element_bytes, onnx_streamed,
                                         split_gathered)
from gemma_export.cli import main


def test_streamed_bytes_are_the_export_weights(tiny):
    """Counted from declarations only (nothing loaded); checked against the loaded arrays and the
    external data file on disk."""
    out = tiny.export("gemma3_sw8")
    graph = out / "decoder.onnx"
    streamed = onnx_streamed(graph)
    loaded = onnx.load(str(graph))  # with external data
    arrays = sum(numpy_helper.to_array(t).nbytes for t in loaded.graph.initializer)
    assert streamed.weights + streamed.gathered == arrays
    assert (out / "decoder.data").stat().st_size <= arrays
    assert onnx_kv_element_bytes(graph, "past_key") == 4  # float32 cache


def test_bound_by_hand():
    """Two layers (a ring of 4 rows, a global one), 1 KV head of dim 2, float32: prompt 3, 4 new
    ids = 3 decode steps attending to 4, 5, 6 positions: rows 4+4, 4+5, 4+6, 16 bytes per row
    (key + value, 2 floats each)."""
    layers = [KvLayer(1, 2, 4), KvLayer(1, 2, None)]
    assert [kv_bytes_per_step(layers, c, 4) for c in (4, 5, 6)] == [128, 144, 160]
    assert mean_kv_bytes(layers, 3, 4, 4) == 144
    assert mean_kv_bytes(layers, 3, 1, 4) == 0  # no decode step
    weights = 1000 - 144
    assert bound_tokens_per_second(10_000, weights + 144) == 10
    report = {"runs": [{"prompt_tokens": 3, "new_tokens": 4, "decode_tps": 5.0}]}
    run = add_bounds(report, weights, layers, 4, bandwidth=10_000)["runs"][0]
    assert (run["bytes_per_token"], run["bound_tps"], run["fraction_of_bound"]) == (1000, 10, 0.5)


def test_gathered_tables_are_left_out():
    sizes = {"embed": 100, "w": 10, "tied": 50}
    uses = {"embed": ["Gather"], "w": ["MatMulNBits"], "tied": ["GatherBlockQuantized", "MatMulNBits"]}
    assert split_gathered(sizes, uses) == Streamed(60, 100)
    # llama.cpp: token_embd is the LM head too unless the file has output.weight
    assert gguf_streamed_sizes({"token_embd.weight": 100, "blk.0.w": 10}) == Streamed(110, 0)
    assert gguf_streamed_sizes({"token_embd.weight": 100, "output.weight": 80, "blk.0.w": 10}) == Streamed(90, 100)


def test_gguf_tensor_bytes_fill_the_real_file():
    from gemma_export.checkpoint import default_gguf_path

    path = default_gguf_path()
    streamed = gguf_streamed(path)
    assert streamed.gathered == 0  # Gemma 3 270M ties its LM head to token_embd
    header = path.stat().st_size - streamed.weights  # metadata: the tokenizer's vocabulary, alignment
    assert 0 < header < 0.1 * path.stat().st_size


def _engines(ours_prefill, other_prefill, ours_decode, other_decode, fraction):
    def run(prefill, decode):
        return {"prompt_tokens": 128, "ttft_s": 128 / prefill, "prefill_tps": prefill, "decode_tps": decode,
                "new_tokens": 128, "bound_tps": 2 * decode, "fraction_of_bound": fraction, "agree_with_ours": 3,
                "kv_bytes_per_token": 2**20}
    common = {"status": "ok", "note": "", "peak_rss": 2**30, "load_s": 1.0, "weight_bytes_per_token": 2**28}
    return {"ours": {**common, "label": "ours", "runs": [run(ours_prefill, ours_decode)]},
            "genai": {**common, "label": "ort-genai", "runs": [run(other_prefill, other_decode)]},
            "llama": {"status": "skipped", "note": "not installed", "label": "llama.cpp"}}


def test_ratios_and_goals():
    engines = _engines(300.0, 100.0, 40.0, 40.0, 0.6)
    assert ratio(engines, "prefill_tps", "genai", 128) == 3.0
    assert ratio(engines, "prefill_tps", "llama", 128) is None
    goals = {g["goal"]: g for g in goal_results(engines, [128])}
    assert goals["prefill ours / ort-genai int4"]["met"] is True
    assert goals["decode ours / ort-genai int4"]["met"] is False  # 1.0 < 1.25
    assert goals["prefill ours / llama.cpp"]["met"] is None
    assert goals["decode ours / bandwidth bound"]["value"] == 0.6
    table = format_table({"engines": engines, "settings": {"prompt_tokens": [128], "new_tokens": 128},
                          "goals": list(goals.values())})
    assert "3.00" in table and "llama.cpp: skipped: not installed" in table
    assert agreement([1, 2, 3], [1, 2, 4]) == 2


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be at least 1"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--prompt-tokens", "60", "--new-tokens", "8"], "must fit OUT's context of 64"),
    (["--prompt-tokens", "8", "8"], "a length twice"),
    (["--json", "/nonexistent/folder/out.json"], "does not exist"),
    (["--genai", "/"], "not an onnxruntime-genai model folder"),
    (["--gguf", "/nonexistent.gguf"], "no such file"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--rounds", "0"], "--rounds must be at least 1"),
])
def test_bad_arguments_are_refused_before_anything_runs(tiny, capsys, args, message):
    out = tiny.export("gemma3_sw8")
    # fits the tiny export's context of 64; a flag given again in `args` wins (argparse)
    assert main(["bench", str(out), "--prompt-tokens", "8", "--new-tokens", "8", *args]) == 2
    assert message in capsys.readouterr().err


def test_not_an_export_folder(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "not a readable export folder" in capsys.readouterr().err


def test_rounds_keep_each_figures_best():
    """Reports of one engine from several rounds: per prompt the best decode run, the best prefill
    and the least time to first token of any round, the least load, the largest peak RSS."""
    from gemma_export.bench.compare import merge_rounds

    def run(prompt, prefill, decode, ttft):
        return {"prompt_tokens": prompt, "prefill_tps": prefill, "decode_tps": decode, "ttft_s": ttft, "first_ids": [prompt]}

    a = {"load_s": 0.5, "peak_rss": 100, "runs": [run(128, 900.0, 80.0, 0.14), run(1024, 1000.0, 70.0, 1.0)]}
    b = {"load_s": 0.4, "peak_rss": 120, "runs": [run(128, 1000.0, 75.0, 0.13), run(1024, 950.0, 72.0, 1.1)]}
    merged = merge_rounds([a, b])
    assert merged["load_s"] == 0.4 and merged["peak_rss"] == 120
    assert [(r["prompt_tokens"], r["prefill_tps"], r["decode_tps"], r["ttft_s"]) for r in merged["runs"]] == [
        (128, 1000.0, 80.0, 0.13), (1024, 1000.0, 72.0, 1.0)]
    assert merge_rounds([a]) == a
