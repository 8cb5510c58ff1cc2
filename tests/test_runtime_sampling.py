"""Sampling on synthetic logits: validation, each filter's support, seeds, the checkpoint's defaults
(read from generation_config.json, and used by generate/chat on a tiny export), memory per step."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models

from gemma_runtime import GemmaRuntimeError, Model, SamplingConfig, SamplingError
from gemma_runtime.errors import GenerationConfigError
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

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": None, "temperature": 0.5}))
    assert read_generation_defaults(tmp_path).sampling == SamplingConfig(temperature=0.5)  # null top_k: off


@pytest.mark.parametrize("raw, match", [
    ({"repetition_penalty": "x"}, "repetition_penalty must be a number, got 'x'"),
    ({"repetition_penalty": "1.2"}, "repetition_penalty must be a number, got '1.2'"),
    ({"do_sample": True, "temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({"do_sample": False, "top_p": [0.9]}, r"top_p must be a number, got \[0.9\]"),  # checked though greedy ignores it
    ({"do_sample": True, "top_k": 2.5}, "top_k must be an integer, got 2.5"),
    ({"min_p": True}, "min_p must be a number, got True"),
    ({"max_new_tokens": "many"}, "max_new_tokens must be an integer, got 'many'"),
    ({"max_new_tokens": -3}, "max_new_tokens must be >= 0, got -3"),
    ({"do_sample": "yes"}, "do_sample must be true or false, got 'yes'"),
    ({"do_sample": True, "top_p": 1.5}, r"cannot use: top_p must be in \(0, 1\]"),
])
def test_generation_config_values_of_the_wrong_kind(tmp_path, raw, match):
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    with pytest.raises(GenerationConfigError, match=f"generation_config.json.*{match}") as err:
        read_generation_defaults(tmp_path)
    assert str(tmp_path) in str(err.value) and isinstance(err.value, GemmaRuntimeError)

# ---- exactness against a sort-based reference, and memory per step ------------------------------


def reference_distribution(x, c: SamplingConfig, history=()):
    """The filters as a plain sort would apply them: rank by probability (ties by id), top-k,
    top-p over the top-k survivors renormalized, min-p relative to the most probable survivor."""
    w = x.astype(np.float64)
    seen = np.array(sorted(set(history)), dtype=np.int64)
    if c.repetition_penalty != 1 and seen.size:
        w[seen] = np.where(w[seen] > 0, w[seen] / c.repetition_penalty, w[seen] * c.repetition_penalty)
    if c.greedy:
        out = np.zeros_like(w)
        out[np.argmax(w)] = 1.0
        return out
    w *= 1.0 / c.temperature
    w -= w.max()
    np.exp(w, out=w)
    w /= w.sum()
    ids = np.lexsort((np.arange(w.size), -w))
    if 0 < c.top_k < w.size:
        ids = ids[: c.top_k]
    if c.top_p < 1:
        p = w[ids] / w[ids].sum() if 0 < c.top_k < w.size else w[ids]
        before = np.cumsum(p) - p
        ids = ids[: max(1, int(np.count_nonzero(before < c.top_p)))]
    if c.min_p > 0:
        ids = ids[w[ids] >= c.min_p * w[ids].max()]
    out = np.zeros_like(w)
    out[ids] = w[ids]
    return out / out.sum()


def random_case(rng):
    """Logits (continuous, or a few levels so that thresholds fall on ties) and a config."""
    x = rng.standard_normal(V) * rng.choice([0.05, 1.0, 4.0])
    if rng.random() < 0.4:
        x = np.round(x * 2) / 2
    c = SamplingConfig(
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])) if rng.random() < 0.9 else 0.0,
        top_k=int(rng.choice([0, 1, 5, 64, 999, 5000])),
        top_p=float(rng.choice([1.0, rng.uniform(0.05, 0.999)])),
        min_p=float(rng.choice([0.0, 1e-6, rng.uniform(0.01, 0.5)])),
        repetition_penalty=float(rng.choice([1.0, 1.3])),
    )
    return x.astype(np.float32), c, rng.integers(0, V, 30).tolist()


def test_filters_match_the_sort_based_reference():
    rng = np.random.default_rng(2026)
    sizes = []
    for _ in range(400):
        x, c, history = random_case(rng)
        got = Sampler(c, V, history).distribution(x)
        want = reference_distribution(x, c, history)
        assert np.array_equal(got > 0, want > 0), c
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)
        sizes.append(int(np.count_nonzero(want)))
    assert min(sizes) == 1 and max(sizes) > 900 and len(set(sizes)) > 50  # the cases cover narrow and wide sets


def test_ties_at_the_threshold_keep_the_lowest_ids():
    x = np.zeros(V, np.float32)
    x[[500, 900]] = 1.0
    d = Sampler(SamplingConfig(temperature=1.0, top_k=5), V).distribution(x)
    assert np.flatnonzero(d).tolist() == [0, 1, 2, 500, 900]
    d = Sampler(SamplingConfig(temperature=1.0, top_p=0.5), V).distribution(np.zeros(V, np.float32))
    assert np.flatnonzero(d).tolist() == list(range(500))  # mass before id 500 is 0.5: it stays out


def test_filtered_draws_follow_the_distribution():
    x = logits(4)
    c = SamplingConfig(temperature=1.3, top_k=6, top_p=0.9, min_p=0.02, seed=5)
    want = Sampler(c, V).distribution(x)
    counts = np.bincount(draws(c, x, 6000), minlength=V) / 6000
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want)) and np.count_nonzero(want) >= 3
    np.testing.assert_allclose(counts, want, atol=0.025)


BIG_V = 262_144  # Gemma 3's vocabulary


@pytest.mark.parametrize("name, config, scale", [
    ("greedy", SamplingConfig(), 3.0),
    ("temperature", SamplingConfig(temperature=0.8), 3.0),
    ("top_k", SamplingConfig(temperature=1.0, top_k=64), 3.0),
    ("top_p wide nucleus", SamplingConfig(temperature=1.0, top_p=0.95), 0.05),
    ("min_p tiny", SamplingConfig(temperature=1.0, min_p=1e-6), 1.5),
    ("repetition penalty", SamplingConfig(repetition_penalty=1.3), 3.0),
    ("all combined", SamplingConfig(temperature=0.9, top_k=4096, top_p=0.9, min_p=1e-4,
                                    repetition_penalty=1.2), 0.5),
])
def test_one_step_allocates_at_most_one_vocabulary_sized_array(name, config, scale):
    """tracemalloc sees numpy's data allocations: the peak during one step (after the Sampler's
    own buffers exist) stays within one float64 array of the vocabulary plus small slack."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(BIG_V) * scale).astype(np.float32).reshape(1, BIG_V)  # the decoder's [1, V]
    history = rng.integers(0, BIG_V, 300).tolist()
    kept = np.count_nonzero(reference_distribution(x.reshape(-1), config, history))
    if name == "top_p wide nucleus":
        assert kept > 64 * 8 ** 3  # wider than every guess before the whole vocabulary
    if name == "min_p tiny":
        assert kept > BIG_V // 2
    sampler = Sampler(config, BIG_V, history)
    tracemalloc.start()
    try:
        for step in range(2):
            tracemalloc.reset_peak()
            token = sampler.choose(x)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak <= 8 * BIG_V + 64 * 1024, f"{name}: step {step} peaked at {peak} bytes"
    finally:
        tracemalloc.stop()
    assert reference_distribution(x.reshape(-1), config, history)[token] > 0



# ---- the checkpoint's defaults, end to end on a tiny export ----------------------------------------

DEFAULTS = dict(temperature=1.5, top_k=20, top_p=0.9)


def full_vocab_tokenizer(size: int) -> Tokenizer:
    """One token per model id, each decoding to its own text (letters, then Q<id>), so a random
    model's ids decode without loss and the text compares ids (byte-fallback runs would not:
    tokenizers renders a broken one as U+FFFD, test_runtime_detokenize.py)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        vocab[ch] = len(vocab)
    vocab.update({f"Q{i}": i for i in range(len(vocab), size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture(scope="module")
def sampling_export(tiny, tmp_path_factory):
    """The tiny Gemma 3 export with a tokenizer, a short chat template and a generation_config.json
    that samples; the new files get their sha256 in the manifest, as the exporter writes them."""
    base = tiny.export("gemma3_sw8")
    out = tmp_path_factory.mktemp("sampling") / "gemma3_sw8"
    shutil.copytree(base, out)
    manifest = json.loads((out / "manifest.json").read_text())
    full_vocab_tokenizer(manifest["vocab_size"]).save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
                                                            "do_sample": True, **DEFAULTS}))
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        manifest["files"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    manifest["tokenizer_files"] = ["tokenizer.json", "chat_template.jinja"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return base, out


def test_generate_and_chat_default_to_the_generation_config_generate_ids_stays_greedy(sampling_export):
    base, out = sampling_export
    model = Model.load(out)
    assert model.defaults.sampling == SamplingConfig(**DEFAULTS)
    prompt, messages, n = "hello world", [{"role": "user", "content": "hi there"}], 16
    stop = set(model.manifest.tokens.stop)
    ids = model.encode(prompt)
    greedy_ids = model.generate_ids(ids, max_new_tokens=n)
    greedy_text = model.generate(prompt, max_new_tokens=n, temperature=0)
    assert greedy_text == model.decode([t for t in greedy_ids if t not in stop])
    assert greedy_ids == Model.load(base).generate_ids(ids, max_new_tokens=n)  # the same weights as the tiny export
    texts, chats, other = [], [], []
    for seed in range(5):
        text = model.generate(prompt, max_new_tokens=n, seed=seed)
        assert text == model.generate(prompt, max_new_tokens=n, seed=seed, **DEFAULTS)
        sampled = model.generate_ids(ids, max_new_tokens=n, seed=seed, **DEFAULTS)
        assert text == model.decode([t for t in sampled if t not in stop])
        chat = model.chat(messages, max_new_tokens=n, seed=seed)
        assert chat == model.chat(messages, max_new_tokens=n, seed=seed, **DEFAULTS)
        assert model.generate_ids(ids, max_new_tokens=n, seed=seed) == greedy_ids  # a seed alone does not sample
        texts.append(text)
        chats.append(chat)
        other.append(model.generate(prompt, max_new_tokens=n, seed=seed, temperature=1.5, top_k=0, top_p=1.0))
    assert len(set(texts)) == 5 and greedy_text not in texts  # sampled, not greedy
    assert len(set(chats)) == 5
    assert other != texts  # top_k 20 and top_p 0.9 of the file took effect
