"""Sampling on synthetic logits: validation, each filter's support, seeds, the checkpoint's defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_runtime import GemmaRuntimeError, SamplingConfig, SamplingError
from gemma_runtime.generation_config import read_generation_defaults
from gemma_runtime.sampling import Sampler

V = 1000


def logits(seed=0):
    return np.random.default_rng(seed).standard_normal(V).astype(np.float32) * 3


def draws(config, x, n=400):
    s = Sampler(config, V)
    return [s.choose(x) for _ in range(n)]


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature must be"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"repetition_penalty": 0}, "repetition_penalty must be"),
    ({"seed": -3}, "seed must be"),
])
def test_invalid_values_are_clear_errors(kwargs, match):
    with pytest.raises(SamplingError, match=match):
        SamplingConfig(**kwargs)
    with pytest.raises(ValueError):  # SamplingError is a ValueError too
        SamplingConfig().override(**kwargs)


def test_unknown_sampling_argument():
    with pytest.raises(SamplingError, match="unknown sampling argument.*tempreature"):
        SamplingConfig().override(tempreature=1.0)


def test_greedy_and_nan():
    x = logits()
    assert Sampler(SamplingConfig(), V).choose(x) == int(np.argmax(x))
    bad = x.copy()
    bad[7] = np.nan
    with pytest.raises(GemmaRuntimeError, match="NaN"):
        Sampler(SamplingConfig(temperature=1.0), V).choose(bad)


def test_seed_reproduces_and_differs():
    x = logits()
    c = SamplingConfig(temperature=1.0, seed=11)
    assert draws(c, x, 50) == draws(c, x, 50)
    assert draws(c, x, 50) != draws(SamplingConfig(temperature=1.0, seed=12), x, 50)


def test_top_k_support():
    x = logits()
    top = set(np.argsort(-x)[:5].tolist())
    got = set(draws(SamplingConfig(temperature=5.0, top_k=5, seed=0), x))
    assert got <= top and len(got) > 1


def test_top_p_is_the_smallest_nucleus():
    x = np.full(V, -30.0, np.float32)
    x[[3, 9, 27]] = np.log([0.5, 0.3, 0.2])  # other tokens have ~0 mass
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.75, seed=0), x)) == {3, 9}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.5, seed=0), x)) == {3}
    # after top-k the nucleus is taken over the renormalized survivors (transformers' order)
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.6, seed=0), x)) == {3, 9}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.6, top_k=2, seed=0), x)) == {3}  # 0.5 / 0.8 >= 0.6
    # flat distribution: the nucleus is wider than the first partition's guess
    flat = np.zeros(V, np.float32)
    assert len(set(draws(SamplingConfig(temperature=1.0, top_p=0.9, seed=0), flat, 3000))) > 500


def test_min_p():
    x = np.full(V, -30.0, np.float32)
    x[[3, 9, 27]] = np.log([0.5, 0.3, 0.05])
    assert set(draws(SamplingConfig(temperature=1.0, min_p=0.2, seed=0), x)) == {3, 9}  # 0.05 < 0.2 * 0.5
    assert set(draws(SamplingConfig(temperature=1.0, min_p=0.2, top_k=10, seed=0), x)) == {3, 9}


def test_temperature_sampling_follows_the_distribution():
    p = np.array([0.6, 0.3, 0.1])
    x = np.full(V, -50.0, np.float32)
    x[:3] = np.log(p)
    counts = np.bincount(draws(SamplingConfig(temperature=1.0, seed=1), x, 4000), minlength=3)[:3] / 4000
    np.testing.assert_allclose(counts, p, atol=0.03)
    sharp = np.bincount(draws(SamplingConfig(temperature=0.25, seed=1), x, 2000), minlength=3)[:3] / 2000
    assert sharp[0] > 0.9  # p^4 renormalized: 0.94


def test_repetition_penalty_matches_transformers_rule():
    x = np.zeros(V, np.float32)
    x[5], x[6] = 2.0, 1.5
    s = Sampler(SamplingConfig(repetition_penalty=2.0), V, history=[5])  # 2.0 -> 1.0 < 1.5
    assert s.choose(x) == 6
    x[6] = -1.0
    x[5] = -0.5
    x[7] = -0.8
    s = Sampler(SamplingConfig(repetition_penalty=2.0), V, history=[5])  # -0.5 -> -1.0 < -0.8
    x[:5] = x[8:] = -5
    assert s.choose(x) == 7
    s.observe(7)  # -0.8 -> -1.6; 5 at -1.0, 6 at -1.0: lowest id wins
    assert s.choose(x) == 5


def test_working_buffer_is_reused():
    s = Sampler(SamplingConfig(temperature=1.0, seed=0), V)
    buf = s._work
    s.choose(logits())
    assert s._work is buf and buf.dtype == np.float64 and buf.size == V


def test_generation_config_defaults(tmp_path):
    assert read_generation_defaults(tmp_path).sampling == SamplingConfig()  # no file: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    assert read_generation_defaults(tmp_path).sampling.greedy
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 64, "top_p": 0.95, "max_new_tokens": 77}))
    d = read_generation_defaults(tmp_path)
    assert d.sampling == SamplingConfig(temperature=1.0, top_k=64, top_p=0.95) and d.max_new_tokens == 77
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert read_generation_defaults(tmp_path).sampling.greedy  # transformers ignores it without do_sample
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": -1}))
    with pytest.raises(GemmaRuntimeError, match="generation_config.json.*temperature"):
        read_generation_defaults(tmp_path)
