"""The runtime's numpy audio front end against transformers' Gemma3nAudioFeatureExtractor."""

from __future__ import annotations

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")

from gemma_runtime.audio_features import (  # noqa: E402
    MAX_SAMPLES,
    AudioError,
    AudioFeatureExtractor,
    audio_features,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    from transformers import Gemma3nAudioFeatureExtractor

    return Gemma3nAudioFeatureExtractor()


def signal(n: int, rate: int = 16_000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Two tones and some noise; [n] or [n, channels] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    cols = [0.3 * np.sin(2 * np.pi * (220 + 170 * c) * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
            + 0.05 * rng.standard_normal(n) for c in range(channels)]
    x = np.stack(cols, axis=1) if channels > 1 else cols[0]
    return x.astype(np.float32)


def assert_same(ours, ref):
    feats, mask = ours
    assert feats.dtype == np.float32 and feats.shape == ref["input_features"].shape
    assert np.abs(feats - ref["input_features"]).max() <= TOL
    assert np.array_equal(mask, ref["input_features_mask"])


@pytest.mark.parametrize("n", [513, 1000, 16_000, 48_123, 160_000, MAX_SAMPLES])
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_matches_hf_on_16k(hf, n, padding):
    x = signal(n)
    ref = hf(x, padding=padding, return_tensors="np")
    assert_same(AudioFeatureExtractor()(x, 16_000, padding=padding), ref)


def test_max_length_is_the_static_encoder_shape():
    feats, mask = audio_features(signal(8_000), 16_000)
    assert feats.shape == (1, 2997, 128) and mask.shape == (1, 2997)
    assert mask[0, :50].all() and not mask[0, 50:].any()  # one frame start every 160 samples


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampled_matches_hf_fed_the_same_resampled_array(hf, rate):
    x = signal(int(1.7 * rate), rate)
    resampled = soxr.resample(x, rate, 16_000).astype(np.float32)
    ref = hf(resampled, padding="max_length", return_tensors="np")
    assert_same(audio_features(x, rate), ref)


def test_stereo_file_is_downmixed(hf, tmp_path):
    x = signal(44_100, 44_100, channels=2)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, x, 44_100, subtype="PCM_24")
    decoded, _ = soundfile.read(path, dtype="float32")
    mono = soxr.resample(decoded.mean(axis=1, dtype=np.float32), 44_100, 16_000).astype(np.float32)
    assert_same(audio_features(path), hf(mono, padding="max_length", return_tensors="np"))


@pytest.mark.parametrize("fmt", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
def test_reads_common_formats(hf, tmp_path, fmt):
    ext, subtype = fmt
    path = tmp_path / f"clip.{ext}"
    soundfile.write(path, signal(20_000), 16_000, subtype=subtype)
    decoded, _ = soundfile.read(path, dtype="float32")
    assert_same(audio_features(path, padding="longest"), hf(decoded, return_tensors="np"))


def test_longer_than_30s_is_an_error_unless_truncated(hf):
    x = signal(MAX_SAMPLES + 1_600)
    with pytest.raises(AudioError, match="30 s"):
        audio_features(x, 16_000)
    assert_same(audio_features(x, 16_000, truncate=True), hf(x, return_tensors="np"))


@pytest.mark.parametrize("audio, match", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros(16_000, np.float32), "silent"),
    (np.full(16_000, np.nan, np.float32), "NaN"),
    (np.zeros((4, 4, 4), np.float32), "shape"),
])
def test_bad_arrays(audio, match):
    with pytest.raises(AudioError, match=match):
        audio_features(audio, 16_000)


def test_bad_sample_rate_and_missing_rate():
    with pytest.raises(AudioError, match="not supported"):
        audio_features(signal(1000), 12_345)
    with pytest.raises(AudioError, match="sample_rate"):
        audio_features(signal(1000))


def test_bad_files(tmp_path):
    with pytest.raises(AudioError, match="not found"):
        audio_features(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 64)
    with pytest.raises(AudioError, match="cannot read"):
        audio_features(garbage)
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, signal(16_000), 16_000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:20_000])
    with pytest.raises(AudioError, match="truncated"):
        audio_features(cut)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16_000)
    with pytest.raises(AudioError, match="empty"):
        audio_features(empty)
