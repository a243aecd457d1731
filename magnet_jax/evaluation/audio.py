"""Audio for the evaluation metrics: audiocraft's resampler in JAX, and reading audio files.

audiocraft's metrics bring every clip to the embedding model's rate with `convert_audio`
(audiocraft/data/audio_utils.py), which is `julius.resample_frac` (zeros=24, rolloff=0.945) followed by the
channel mean. `resample` computes the same windowed-sinc polyphase filter (julius/resample.py): for rates
reduced by their gcd to `old -> new`, `new` kernels of `2 * width + old` taps, applied with stride `old` to the
signal padded by repeating its edge samples, interleaved, and cut to `floor(new * N / old)` samples.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ZEROS = 24  # zero crossings kept in the sinc filter (julius default, used by audiocraft)
ROLLOFF = 0.945  # low-pass cut-off as a fraction of the lower Nyquist rate
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class AudioError(ValueError):
    """An audio file could not be read or holds no samples (message is one line)."""


def _reduced(from_rate: int, to_rate: int) -> tuple[int, int]:
    if int(from_rate) != from_rate or int(to_rate) != to_rate or from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_rate} -> {to_rate}")
    gcd = math.gcd(int(from_rate), int(to_rate))
    return int(from_rate) // gcd, int(to_rate) // gcd


@functools.cache
def _kernels(old: int, new: int) -> tuple[np.ndarray, int]:
    """The `new` polyphase kernels `[new, 2 * width + old]` (float32, each summing to 1) and `width`."""
    cutoff = min(old, new) * ROLLOFF
    width = math.ceil(ZEROS * old / cutoff)
    idx = np.arange(-width, width + old, dtype=np.float32)
    kernels = []
    for i in range(new):
        t = (np.float32(-i / new) + idx / np.float32(old)) * np.float32(cutoff)
        t = np.clip(t, -ZEROS, ZEROS) * np.float32(math.pi)
        window = np.cos(t / ZEROS / 2) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            sinc = np.where(t == 0, np.float32(1.0), np.sin(t) / t)
        kernel = (sinc * window).astype(np.float32)
        kernels.append(kernel / kernel.sum())
    return np.stack(kernels).astype(np.float32), width


def resampled_length(length: int, from_rate: int, to_rate: int) -> int:
    """Samples `resample` returns for `length` input samples (julius: the float32 ratio, floored)."""
    old, new = _reduced(from_rate, to_rate)
    return length if old == new else int(np.floor(np.float32(new * length / old)))


def resample(audio: jax.Array, from_rate: int, to_rate: int) -> jax.Array:
    """`[..., N]` audio at `from_rate` -> `[..., N']` at `to_rate` with julius' `resample_frac` (see module doc)."""
    old, new = _reduced(from_rate, to_rate)
    if old == new:
        return audio
    kernels, width = _kernels(old, new)
    *lead, length = audio.shape
    x = jnp.reshape(audio, (-1, 1, length))
    x = jnp.pad(x, ((0, 0), (0, 0), (width, width + old)), mode="edge")
    y = jax.lax.conv_general_dilated(x, jnp.asarray(kernels)[:, None, :], window_strides=(old,), padding="VALID",
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     precision=jax.lax.Precision.HIGHEST)  # [B, new, L]
    y = jnp.reshape(jnp.swapaxes(y, 1, 2), (*lead, -1))
    return y[..., :resampled_length(length, from_rate, to_rate)]


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Reads an audio file as mono float32 `[N]` (channel mean) and its sample rate; one-line errors."""
    import soundfile as sf

    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError... for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: cannot read audio ({reason})") from e
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio file holds no samples")
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio holds non-finite samples")
    return wav.mean(axis=1), int(sr)


def audio_files(directory: str | os.PathLike) -> list[Path]:
    """The audio files (by suffix: wav, flac, ogg, mp3) directly inside `directory`, sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise AudioError(f"{directory}: not a directory")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
