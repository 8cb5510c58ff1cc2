"""KV cache writes against a reference built from the full history of rows."""

import numpy as np
import pytest

from gemma_runtime.errors import ContextLengthError
from gemma_runtime.kv_cache import KVCache
from gemma_runtime.manifest import CacheSpec, ManifestError

HEADS, DIM = 2, 3


def spec(kind, length, layer=0):
    return CacheSpec(layer, kind, length, HEADS, DIM, f"past_key.{layer}", f"past_value.{layer}",
                     f"new_key.{layer}", f"new_value.{layer}")


def rows(rng, t):
    return rng.standard_normal((1, HEADS, t, DIM)).astype(np.float32)


def run_chunks(cache, index, chunks, rng):
    """Feed chunks (T, valid); return the full history of valid key/value rows by position."""
    hist_k, hist_v, position = [], [], 0
    for t, valid in chunks:
        k, v = rows(rng, t), rows(rng, t)
        cache.write(index, k, v, position, valid)
        hist_k += [k[0, :, i] for i in range(valid)]
        hist_v += [v[0, :, i] for i in range(valid)]
        position += valid
    return np.stack(hist_k, 1), np.stack(hist_v, 1)  # [HEADS, positions, DIM]


def ring_reference(hist, length):
    # Slot s holds the most recent position p with p % length == s (zeros if none yet).
    ref = np.zeros((1, HEADS, length, DIM), np.float32)
    n = hist.shape[1]
    for p in range(max(0, n - length), n):
        ref[0, :, p % length] = hist[:, p]
    return ref


@pytest.mark.parametrize(
    "chunks",
    [
        [(6, 3)],  # valid < T, no wrap
        [(6, 6), (6, 2)],  # wraparound across chunks, padded last chunk
        [(8, 7)],  # valid > length inside one chunk: only the last 4 rows survive
        [(8, 8), (8, 5), (1, 1), (1, 1), (1, 1)],  # chunk then decode steps around the ring
        [(1, 1)] * 11,  # decode only
    ],
)
def test_sliding_ring_matches_history(chunks):
    rng = np.random.default_rng(0)
    cache = KVCache([spec("sliding", 4)])
    hist_k, hist_v = run_chunks(cache, 0, chunks, rng)
    np.testing.assert_array_equal(cache.keys[0], ring_reference(hist_k, 4))
    np.testing.assert_array_equal(cache.values[0], ring_reference(hist_v, 4))


def test_global_writes_valid_rows_at_their_positions_and_never_padding():
    rng = np.random.default_rng(1)
    cache = KVCache([spec("global", 16)])
    hist_k, hist_v = run_chunks(cache, 0, [(6, 6), (6, 4), (1, 1)], rng)
    n = hist_k.shape[1]
    np.testing.assert_array_equal(cache.keys[0][0, :, :n], hist_k)
    np.testing.assert_array_equal(cache.values[0][0, :, :n], hist_v)
    # Padding rows (the chunk's last 2) and unused slots stay zero.
    assert not cache.keys[0][0, :, n:].any() and not cache.values[0][0, :, n:].any()


def test_global_write_past_the_end_is_an_error():
    rng = np.random.default_rng(2)
    cache = KVCache([spec("global", 8)])
    cache.write(0, rows(rng, 6), rows(rng, 6), 0, 6)
    with pytest.raises(ContextLengthError, match="global cache"):
        cache.write(0, rows(rng, 6), rows(rng, 6), 6, 3)


def test_reset_feeds_and_shapes():
    rng = np.random.default_rng(3)
    cache = KVCache([spec("global", 8, 0), spec("sliding", 4, 1)])
    feeds = cache.feeds()
    assert feeds["past_key.0"] is cache.keys[0] and feeds["past_value.1"] is cache.values[1]  # no copies
    assert feeds["past_key.1"].shape == (1, HEADS, 4, DIM) and feeds["past_key.1"].dtype == np.float32
    assert cache.output_names() == ["new_key.0", "new_value.0", "new_key.1", "new_value.1"]
    cache.write(1, rows(rng, 2), rows(rng, 2), 0, 2)
    assert cache.keys[1].any()
    cache.reset()
    assert not any(b.any() for b in (*cache.keys, *cache.values))
    with pytest.raises(ValueError, match="shapes"):
        cache.write(0, rows(rng, 2)[:, :1], rows(rng, 2), 0, 1)


def test_unknown_kind_is_a_manifest_error():
    with pytest.raises(ManifestError, match="unknown kind"):
        KVCache([spec("chunked", 4)])


# ---- windowed buffers (kv_layout "shared_buffer_windowed") -------------------------------------


def test_windowed_resident_rows_follow_onnxruntimes_contract():
    """A buffer of 9 rows for a window of 8 (onnxruntime's sliding_window_cache): full at 9 tokens,
    then it drops 2 positions at once at 10, 12, 14, ...; always at least the window."""
    from gemma_runtime.prompt_cache import resident_rows

    assert [resident_rows(t, 9, 8) for t in range(1, 16)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 9, 8, 9, 8, 9]
    assert [resident_rows(t, 8, 8) for t in (8, 9, 10)] == [8, 8, 8]  # capacity = window: a shift every token


def test_windowed_rollback_only_without_a_shift_in_between():
    from gemma_runtime.prompt_cache import PromptCache

    cache = KVCache([spec("global", 32, 0), spec("sliding", 9, 1)])
    prompt = PromptCache(cache, sliding_window=8, sliding="windowed")
    prompt.fed(range(100, 111))  # 11 tokens: rows hold positions 2..10
    assert prompt.plan(list(range(100, 110)) + [7, 7]) == 10  # 10 tokens also start at 2: exact
    assert prompt.plan(list(range(100, 109)) + [7, 7]) == 0  # 9 tokens start at 0: positions 0, 1 are gone
    prompt.fed([111])  # 12 tokens: positions 4..11
    assert prompt.plan(list(range(100, 111)) + [7]) == 0  # 11 start at 2
    linear = PromptCache(cache, sliding_window=8, sliding="linear")
    linear.fed(range(100, 112))
    assert linear.plan(list(range(100, 105)) + [7]) == 5  # linear buffers roll back freely
    with pytest.raises(ValueError, match="sliding buffers"):
        PromptCache(cache, sliding_window=8, sliding="ring")
