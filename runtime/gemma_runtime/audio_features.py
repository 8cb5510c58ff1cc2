"""Log-mel features for the Gemma 3n audio encoder, with numpy only (no torch, no transformers).

A re-implementation of transformers' `Gemma3nAudioFeatureExtractor` (the USM front end) that
gives the same float32 features and mask for the same 16 kHz waveform:

    waveform (16 kHz mono, float32)
      -> right-pad with zeros to a multiple of 128 samples ("longest") or to 480,000 ("max_length")
      -> frames of 513 samples every 160 (no centring, no edge padding)
      -> HTK pre-emphasis 0.97 inside each frame: [x0*(1-0.97), x1-0.97*x0, ..., x511-0.97*x510]
      -> periodic Hann window of 512
      -> |rfft| with n_fft = 1024 (512 rounded up to a power of two, doubled by "fft overdrive")
      -> 128 triangular mel filters, 125..7600 Hz, HTK mel scale, no normalisation
      -> log(max(mel, 1e-5))
    mask: the sample mask taken every 160 samples, cut to the number of frames.

The dtypes follow the reference step by step (float32 frames and FFT, float64 filterbank and log)
so that the result matches it to float32 rounding.

Audio is read with soundfile (wav, flac, ogg, ...) and resampled to 16 kHz with soxr; both are
imported only when needed, so text-only users do not pay for them. Stereo (or any multichannel)
audio is averaged to mono, as librosa's `to_mono` does for the Hugging Face `load_audio`.

Longer than 30 s: the encoder graph is static for 30 s (480,000 samples). By default longer audio
raises AudioError naming the limit; `truncate=True` keeps the first 30 s, as the Hugging Face
extractor silently does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16_000
MAX_SAMPLES = 480_000  # 30 s at 16 kHz; the extractor's max_length
PAD_TO_MULTIPLE_OF = 128
SUPPORTED_RATES = (8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)


@dataclass(frozen=True)
class FrontEndConfig:
    """The extractor's settings (the released checkpoint's preprocessor_config.json uses these)."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    fft_overdrive: bool = True
    mel_floor: float = 1e-5

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))  # 512

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))  # 160

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return n * 2 if self.fft_overdrive else n  # 1024

    def num_frames(self, num_samples: int) -> int:
        return max(0, (num_samples - (self.frame_length + 1)) // self.hop_length + 1)


def mel_filterbank(cfg: FrontEndConfig) -> np.ndarray:
    """[n_fft/2+1, n_mels] float64 triangular HTK-mel filters, computed as transformers does."""
    n_freqs = cfg.fft_length // 2 + 1
    all_freqs = np.arange(n_freqs, dtype=np.float32) * (cfg.sampling_rate / cfg.fft_length)
    m_min = 2595.0 * math.log10(1.0 + (cfg.min_frequency / 700.0))
    m_max = 2595.0 * math.log10(1.0 + (cfg.max_frequency / 700.0))
    m_pts = np.linspace(m_min, m_max, cfg.feature_size + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = np.expand_dims(f_pts, 0) - np.expand_dims(all_freqs, 1)
    down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(np.zeros(1, dtype=np.float32), np.minimum(down, up))


class AudioFeatureExtractor:
    """`features, mask = AudioFeatureExtractor()(audio)`: features [1, F, 128] float32, mask [1, F] bool."""

    def __init__(self, cfg: FrontEndConfig = FrontEndConfig()):
        self.cfg = cfg

    @cached_property
    def window(self) -> np.ndarray:
        n = np.arange(self.cfg.frame_length, dtype=np.float32)
        return (0.5 * (1 - np.cos(2 * np.pi * n / self.cfg.frame_length))).astype(np.float32)

    @cached_property
    def filters(self) -> np.ndarray:
        return mel_filterbank(self.cfg)

    def __call__(self, audio, sample_rate: int | None = None, *, padding: str = "longest",
                 truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """audio: a path (wav/flac/ogg/...) or an array with `sample_rate` ([N] or [N, channels]).

        padding="longest" pads to a multiple of 128 samples (the Hugging Face default for one clip);
        padding="max_length" pads to 30 s, the static shape of the exported encoder (F = 2997).
        """
        wave = load_audio(audio, sample_rate)
        return self.from_waveform(wave, padding=padding, truncate=truncate)

    def from_waveform(self, wave: np.ndarray, *, padding: str = "longest",
                      truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Features of a 16 kHz mono float waveform (checked by `check_waveform`)."""
        wave = check_waveform(wave, truncate=truncate)
        padded, sample_mask = pad_waveform(wave, padding)
        features = self.log_mel(padded)
        mask = sample_mask[:: self.cfg.hop_length][: features.shape[0]]
        return features[None], mask[None]

    def log_mel(self, padded: np.ndarray) -> np.ndarray:
        """[N] float32 -> [F, 128] float32 log-mel, step for step (and dtype for dtype) as transformers."""
        cfg = self.cfg
        size = cfg.frame_length + 1
        num_frames = cfg.num_frames(padded.shape[0])
        if num_frames == 0:
            raise AudioError(f"audio of {padded.shape[0]} samples is shorter than one frame "
                             f"({size} samples at {cfg.sampling_rate} Hz)")
        stride = padded.strides[0]
        frames = np.lib.stride_tricks.as_strided(
            padded, shape=(num_frames, size), strides=(stride * cfg.hop_length, stride))
        first = frames[:, :1] * (1.0 - cfg.preemphasis)
        rest = frames[:, 1:-1] - cfg.preemphasis * frames[:, :-2]
        frames = np.concatenate([first, rest], axis=-1) * self.window
        magnitude = np.abs(np.fft.rfft(frames, n=cfg.fft_length, axis=-1))
        mel = np.matmul(magnitude, self.filters)
        log_mel = np.log(np.maximum(mel, np.array(cfg.mel_floor, dtype=np.float64)))
        return log_mel.astype(np.float32)


def pad_waveform(wave: np.ndarray, padding: str) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with zeros as SequenceFeatureExtractor.pad does; returns (samples, sample mask)."""
    n = wave.shape[0]
    if padding == "longest":
        target = -(-n // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    elif padding == "max_length":
        target = MAX_SAMPLES
    else:
        raise AudioError(f"padding must be 'longest' or 'max_length', not {padding!r}")
    padded = np.zeros(target, dtype=np.float32)
    padded[:n] = wave
    mask = np.zeros(target, dtype=bool)
    mask[:n] = True
    return padded, mask


def check_waveform(wave: np.ndarray, *, truncate: bool = False) -> np.ndarray:
    """A 1-D finite float32 waveform of 1..480,000 samples, not all zero."""
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise AudioError(f"a waveform must be 1-D (mono) here, got shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise AudioError(f"a waveform must hold floats in [-1, 1], got dtype {wave.dtype}")
    wave = wave.astype(np.float32)
    if wave.shape[0] == 0:
        raise AudioError("the audio is empty (zero samples)")
    if not np.all(np.isfinite(wave)):
        raise AudioError("the audio holds NaN or infinite samples")
    if wave.shape[0] > MAX_SAMPLES:
        if not truncate:
            raise AudioError(f"the audio lasts {wave.shape[0] / SAMPLE_RATE:.2f} s; the limit is "
                             f"30 s ({MAX_SAMPLES} samples at 16 kHz): cut it, or pass truncate=True "
                             "to keep the first 30 s as the Hugging Face extractor does")
        wave = wave[:MAX_SAMPLES]
    if not np.any(wave):
        raise AudioError("the audio is silent (every sample is zero)")
    return wave


def load_audio(audio, sample_rate: int | None = None) -> np.ndarray:
    """A path, or an array with its sample rate -> 16 kHz mono float32 (not yet length-checked)."""
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise AudioError("sample_rate is read from the file; pass it only with an array")
        wave, sample_rate = read_audio_file(audio)
    else:
        if sample_rate is None:
            raise AudioError("an audio array needs its sample_rate (e.g. (array, 16000))")
        wave = np.asarray(audio)
        if wave.dtype.kind in "iu":  # PCM integers -> [-1, 1]
            wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
        elif not np.issubdtype(wave.dtype, np.floating):
            raise AudioError(f"an audio array must hold floats or PCM integers, got {wave.dtype}")
        wave = wave.astype(np.float32, copy=False)
    wave = to_mono(wave)
    return resample(wave, int(sample_rate))


def to_mono(wave: np.ndarray) -> np.ndarray:
    """[N] stays; [N, C] (soundfile's layout) is averaged over channels."""
    if wave.ndim == 1:
        return wave
    if wave.ndim == 2:
        return wave.mean(axis=1, dtype=np.float32)
    raise AudioError(f"audio must be [samples] or [samples, channels], got shape {wave.shape}")


def resample(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return wave
    if sample_rate not in SUPPORTED_RATES:
        raise AudioError(f"sample rate {sample_rate} Hz is not supported; use one of "
                         f"{', '.join(str(r) for r in SUPPORTED_RATES)}")
    if wave.shape[0] == 0:
        return wave
    try:
        import soxr
    except ImportError as e:
        raise AudioError("resampling audio needs the soxr package: pip install soxr") from e
    return soxr.resample(wave, sample_rate, SAMPLE_RATE).astype(np.float32, copy=False)


def read_audio_file(path) -> tuple[np.ndarray, int]:
    """Decode a whole file with soundfile; [N] or [N, C] float32 and its sample rate."""
    try:
        import soundfile
    except ImportError as e:
        raise AudioError("reading audio files needs the soundfile package: pip install soundfile") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        with soundfile.SoundFile(path) as f:
            expected = f.frames
            wave = f.read(dtype="float32", always_2d=False)
            sample_rate = f.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    declared = _wav_declared_data_bytes(path)
    if declared is not None and declared > os.path.getsize(path):
        raise AudioError(f"audio file {path} is truncated: its WAV header declares more data "
                         f"than the file holds ({os.path.getsize(path)} bytes)")
    if expected > 0 and wave.shape[0] < expected:
        raise AudioError(f"audio file {path} is truncated: its header says {expected} frames, "
                         f"only {wave.shape[0]} could be read")
    return wave, sample_rate


def _wav_declared_data_bytes(path: str) -> int | None:
    """End offset of a RIFF/WAVE file's data chunk as its header declares it (None if not a WAV).

    libsndfile quietly reads what is there of a cut WAV file, so the cut is found here.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                return offset + 8 + size if size != 0xFFFFFFFF else None
            offset += 8 + size + (size & 1)
            f.seek(offset)


def audio_features(audio, sample_rate: int | None = None, *, padding: str = "max_length",
                   truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features for the exported encoder: padded to 30 s by default ([1, 2997, 128], [1, 2997])."""
    return AudioFeatureExtractor()(audio, sample_rate, padding=padding, truncate=truncate)
