"""Bad input to the runtime: each a clear error from the API and one line + exit 2 from the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gemma_runtime import (
    ContextLengthError,
    IntegrityError,
    InvalidArgumentError,
    ManifestError,
    Model,
    ProviderError,
    SamplingError,
)
from gemma_runtime.cli import main
from gemma_runtime.errors import GenerationConfigError
from test_runtime_model import BOS, Fake, tokenizer


@pytest.fixture
def out(tmp_path):
    return Fake(vocab=tokenizer().get_vocab_size(), stop=(1,), seed=2).write(tmp_path / "out", tokenizer=tokenizer())


def cli_fails(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gemma-run: error: ") and err.count("\n") == 1, err
    return err


def test_not_an_export_folder(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ManifestError, match="not an export folder"):
        Model.load(tmp_path / "plain")
    assert "not an export folder" in cli_fails(capsys, tmp_path / "plain", "hi")
    assert "not a folder" in cli_fails(capsys, tmp_path / "nowhere", "hi")


def test_other_format_version(out, capsys):
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="format version 99"):
        Model.load(out)
    assert "format version 99" in cli_fails(capsys, out, "hi")


def test_missing_and_changed_files(out, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (out / "embed_tokens.bin").unlink()
    with pytest.raises(IntegrityError, match="embed_tokens.bin is missing"):
        Model.load(out)
    assert "embed_tokens.bin is missing" in cli_fails(capsys, out, "hi")
    with open(other / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(IntegrityError, match="tokenizer.json.*does not match"):
        Model.load(other)
    assert "tokenizer.json" in cli_fails(capsys, other, "hi")


def test_too_long_and_empty_prompts(out, capsys):
    model = Model.load(out)
    with pytest.raises(ContextLengthError, match="context limit of 24 tokens"):
        model.generate("a" * 40)
    with pytest.raises(ContextLengthError, match="context limit of 24"):
        model.chat([{"role": "user", "content": "a" * 40}])
    with pytest.raises(InvalidArgumentError, match="prompt is empty"):
        model.generate("")
    with pytest.raises(ContextLengthError, match="at least 1"):
        model.generate_ids([])
    assert "context limit of 24" in cli_fails(capsys, out, "a" * 40)
    assert "prompt is empty" in cli_fails(capsys, out, "")


@pytest.mark.parametrize("kwargs, flags, match", [
    ({"temperature": -1.0}, ["--temperature", "-1"], "temperature must be"),
    ({"top_p": 0.0}, ["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.2}, ["--top-p", "1.2"], r"top_p must be in \(0, 1\]"),
    ({"min_p": 1.0}, ["--min-p", "1"], r"min_p must be"),
    ({"top_k": -5}, ["--top-k", "-5"], "top_k must be"),
    ({"repetition_penalty": 0.0}, ["--repetition-penalty", "0"], "repetition_penalty must be"),
])
def test_invalid_sampling_values(out, capsys, kwargs, flags, match):
    model = Model.load(out)
    with pytest.raises(SamplingError, match=match):
        model.generate("ab", **kwargs)
    with pytest.raises(SamplingError, match=match):
        model.generate_ids([BOS, 4], **kwargs)
    assert "must be" in cli_fails(capsys, out, "ab", *flags)


def test_other_bad_arguments(out):
    model = Model.load(out)
    with pytest.raises(SamplingError, match="unknown sampling argument"):
        model.generate("ab", temprature=0.5)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        model.generate("ab", max_new_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="images are not supported by this export"):
        model.generate("ab", images=["cat.png"])
    with pytest.raises(InvalidArgumentError, match="stop must be"):
        model.generate("ab", stop=[""])


def test_provider_not_installed(out, capsys):
    with pytest.raises(ProviderError, match="install onnxruntime-directml"):
        Model.load(out, provider="dml")
    assert "onnxruntime-directml" in cli_fails(capsys, out, "hi", "--provider", "dml")


def test_chat_cli_refuses_an_overlong_turn_and_goes_on(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    out = Fake(vocab=tokenizer().get_vocab_size(), stop=(1,), seed=2).write(tmp_path / "out", tokenizer=tokenizer())
    proc = subprocess.run([sys.executable, "-m", "gemma_runtime.cli", str(out), "--chat", "--max-new-tokens", "3"],
                          input="a" * 40 + "\nab\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "context limit of 24 tokens" in proc.stderr and "/reset" in proc.stderr
    assert proc.stderr.count("time to first token") == 1  # the second turn was answered


def test_generation_config_with_a_non_numeric_value(tmp_path, capsys):
    """A checksummed generation_config.json whose repetition_penalty is "x": the runtime's error
    naming the file and the field, and one line with exit 2 from the CLI (not a traceback)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "repetition_penalty": "x"}))
    out = Fake(vocab=tokenizer().get_vocab_size(), stop=(1,), seed=2).write(tmp_path / "out", tokenizer=tokenizer())
    assert "generation_config.json" in json.loads((out / "manifest.json").read_text())["files"]
    with pytest.raises(GenerationConfigError, match=r"out/generation_config.json: repetition_penalty must be a number, "
                                                    r"got 'x'"):
        Model.load(out)
    err = cli_fails(capsys, out, "ab")
    assert "generation_config.json: repetition_penalty must be a number, got 'x'" in err


def test_an_answer_that_would_run_past_the_context_stops_with_context_full(tmp_path, capsys):
    """A prompt that fits is not refused because its answer might not: generation stops when the
    context is full, with the text so far and stop_reason context_full (runtime/README.md)."""
    out = Fake(vocab=tokenizer().get_vocab_size(), seed=2).write(tmp_path / "out", tokenizer=tokenizer())  # no stop id
    model = Model.load(out)
    prompt = "abcdefghijklmnopqr"
    ids = model.encode(prompt)
    assert len(ids) == 19 and model.manifest.max_context == 24
    new = model.generate_ids(ids, max_new_tokens=50)
    assert len(new) == 5 and model.last_stats.stop_reason == "context_full"
    text = model.generate(prompt, max_new_tokens=50)  # the same 5 tokens, as text (random ids: bytes too)
    assert text and model.last_stats.stop_reason == "context_full"
    assert model.last_stats.decode_tokens == 4  # the first new token comes from prefill
    model.generate(prompt, max_new_tokens=3)
    assert model.last_stats.stop_reason == "max_new_tokens"
    assert main([str(out), prompt, "--max-new-tokens", "50", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == text + "\n" and captured.err.rstrip().endswith("end: context_full")
