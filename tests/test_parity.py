"""Parity of the fp32 export (run by the real runtime) with the eager Hugging Face model.

DESIGN.md "Fidelity": logits max abs diff <= 1e-4 * max(1, |logits|max) for prefill and 32 decode
steps, with prompt + generation crossing the sliding window and more than one prefill chunk;
greedy tokens identical for 32 tokens.

The prompt has 21 ids: three prefill chunks of 8, the last one partial (valid = 5); 21 + 32 = 53
positions cross sliding windows of 5 (< the chunk: a chunk overruns its ring), 8 (= the chunk) and
24 (> the chunk) and stay inside
max_context 64. For Gemma 3n the prompt holds ids >= vocab_size_per_layer_input (280), which read
per-layer row 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import PROMPT_LEN, VOCAB, prompt_ids, runtime_logits
from gemma_runtime import Model

NEW_TOKENS = 32
FAMILIES = ["gemma", "gemma3_sw5", "gemma3_sw8", "gemma3_sw24", "gemma3n", "gemma3n_released"]


@pytest.fixture(scope="module")
def loaded(tiny):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = (Model.load(tiny.export(family)), tiny.reference(family))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_prefill_and_decode(family, loaded, record_property):
    model, ref = loaded(family)
    assert model.manifest.prefill_chunk == 8 and model.manifest.max_context == 64
    prompt = prompt_ids()
    ours, tokens = runtime_logits(model, prompt, NEW_TOKENS)
    with torch.no_grad():  # teacher-forced on the runtime's greedy tokens, one eager forward
        full = ref(torch.tensor([prompt + tokens])).logits[0].float().numpy()
    expected = full[PROMPT_LEN - 1:PROMPT_LEN + NEW_TOKENS]
    assert ours.shape == expected.shape == (NEW_TOKENS + 1, VOCAB)
    diff = float(np.abs(ours - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    print(f"\nparity {family}: logits max abs diff {diff:.3g} (|ref| max {scale:.3g}, "
          f"{len(set(tokens))} distinct greedy tokens)")
    record_property(f"parity_max_abs_diff_{family}", diff)
    record_property(f"parity_ref_abs_max_{family}", scale)
    assert diff <= 1e-4 * scale, f"{family}: logits differ by {diff} (budget {1e-4 * scale})"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens(family, loaded, record_property):
    model, ref = loaded(family)
    prompt = prompt_ids()
    ours = model.generate_ids(prompt, NEW_TOKENS)
    stop = set(model.manifest.tokens.stop)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=sorted(stop) or None,
                           pad_token_id=ref.config.pad_token_id)
    theirs = out[0, len(prompt):].tolist()
    for i, t in enumerate(theirs):  # Hugging Face pads after the stop token; the runtime ends there
        if t in stop:
            theirs = theirs[:i + 1]
            break
    record_property(f"greedy_tokens_{family}", len(ours))
    assert ours == theirs
    # a comparison of 32 tokens, not of an early stop (the prompts are chosen so)
    assert len(ours) == NEW_TOKENS


@pytest.mark.parametrize("family", ["gemma3_sw5", "gemma3_sw8", "gemma3n"])
@pytest.mark.parametrize("length", [1, 8, 9, 16])
def test_logits_at_chunk_boundaries(family, length, loaded):
    """Prompts of one token, exactly one or two chunks, and one past a chunk, then 10 decode steps."""
    model, ref = loaded(family)
    prompt = prompt_ids(seed=length)[:length]
    ours, tokens = runtime_logits(model, prompt, 10)
    with torch.no_grad():
        full = ref(torch.tensor([prompt + tokens])).logits[0].float().numpy()
    expected = full[length - 1:length + 10]
    diff = float(np.abs(ours - expected).max())
    assert diff <= 1e-4 * max(1.0, float(np.abs(expected).max())), f"{family}, prompt {length}: {diff}"
