"""Audio on the host: reading files, downmixing and resampling to a model's rate."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from magnet_jax.cli import reason


def to_codec_audio(wav: np.ndarray, sample_rate: int, codec_rate: int) -> np.ndarray:
    """`[B, C, N]` audio at `sample_rate` -> mono `[B, 1, N']` float32 at `codec_rate` (channel mean, soxr VHQ)."""
    mono = np.asarray(wav, np.float32).mean(axis=1)
    if sample_rate != codec_rate:
        mono = np.stack([soxr.resample(row, sample_rate, codec_rate, quality="VHQ") for row in mono])
    return np.ascontiguousarray(mono[:, None], dtype=np.float32)


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


class AudioError(ValueError):
    """An audio file could not be read, holds no samples or non-finite ones (message is one line)."""


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """An audio file as float32 `[C, N]` and its sample rate; an AudioError names the file and the problem."""
    try:
        wav, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors come in several types; all mean "unreadable"
        raise AudioError(f"{path}: cannot read audio ({reason(e)})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio file holds no samples")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{path}: audio holds non-finite (NaN or Inf) samples")
    return np.ascontiguousarray(wav.T), int(sample_rate)


def audio_files(directory: str | os.PathLike) -> list[Path]:
    """The audio files (by suffix: wav, flac, ogg, mp3) directly inside `directory`, sorted by name."""
    root = Path(directory)
    if not root.is_dir():
        raise AudioError(f"{directory}: not a directory")
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
