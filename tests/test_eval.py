"""gemma-export eval: scores, the command line, and no torch on the evaluation path."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gemma_export.cli import main as export_main
from gemma_export.evaluate import evaluate_ids
from gemma_export.package import requantize_export
from gemma_export.recipes import make_recipe


def test_an_export_against_itself_is_perfect(tiny):
    folder = tiny.export("gemma3_sw24")
    ids = np.random.default_rng(0).integers(3, 300, size=140).tolist()  # > max_context: 3 segments
    result = evaluate_ids(folder, [folder], ids)
    (s,) = result.candidates
    assert result.tokens == 140 and result.segments == 3
    assert s.top1 == 1.0 and abs(s.kl) < 1e-6 and abs(s.ppl_ratio - 1) < 1e-6
    assert "all-positions" in result.method


def test_int8_scores_close_to_reference(tiny, tmp_path):
    ref = tiny.export("gemma3_sw8")
    q = tmp_path / "int8"
    requantize_export(ref, q, make_recipe("int8"))
    ids = np.random.default_rng(1).integers(3, 300, size=100).tolist()
    (s,) = evaluate_ids(ref, [q], ids).candidates
    assert 0 < s.kl < 0.01 and s.top1 > 0.8 and abs(s.ppl_ratio - 1) < 0.05


def test_eval_needs_a_tokenizer_for_text(tiny, tmp_path, capsys):
    folder = tiny.export("gemma")
    text = tmp_path / "t.txt"
    text.write_text("some text")
    capsys.readouterr()  # building the export (when this test runs first) prints transformers' progress
    rc = export_main(["eval", str(folder), "--reference", str(folder), "--text", str(text)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "tokenizer.json" in err[0]


def test_eval_does_not_import_torch(tiny):
    ref, cand = tiny.export("gemma3n"), tiny.export("gemma3n")
    code = (
        "import sys\n"
        "from gemma_export.evaluate import evaluate_ids\n"
        f"r = evaluate_ids({str(ref)!r}, [{str(cand)!r}], list(range(3, 40)))\n"
        "assert r.candidates[0].top1 == 1.0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("args, words", [
    (["--max-tokens", "1"], ["--max-tokens"]),
    (["--text", "/nonexistent/file.txt"], ["cannot read"]),
])
def test_eval_bad_input(tiny, capsys, args, words):
    folder = tiny.export("gemma")
    base = {"--text": __file__}
    argv = ["eval", str(folder), "--reference", str(folder)]
    given = dict(zip(args[::2], args[1::2]))
    for k, v in {**base, **given}.items():
        argv += [k, v]
    rc = export_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), err


def test_eval_json(tiny, tmp_path, capsys, monkeypatch):
    """--json prints the result as JSON (ids through the Python API: the tiny exports have no tokenizer)."""
    import gemma_export.evaluate as ev

    folder = tiny.export("gemma3_sw24")
    monkeypatch.setattr(ev, "encode_text", lambda reference, text: list(range(3, 60)))
    text = tmp_path / "t.txt"
    text.write_text("x")
    assert export_main(["eval", str(folder), "--reference", str(folder), "--text", str(text), "--json", "--max-tokens", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 50 and out["candidates"][0]["top1"] == 1.0
