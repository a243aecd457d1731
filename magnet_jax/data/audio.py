"""Audio on the host: reading files, downmixing and resampling to a model's rate."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import soxr


def to_codec_audio(wav: np.ndarray, sample_rate: int, codec_rate: int) -> np.ndarray:
    """`[B, C, N]` audio at `sample_rate` -> mono `[B, 1, N']` float32 at `codec_rate` (channel mean, soxr VHQ)."""
    mono = np.asarray(wav, np.float32).mean(axis=1)
    if sample_rate != codec_rate:
        mono = np.stack([soxr.resample(row, sample_rate, codec_rate, quality="VHQ") for row in mono])
    return np.ascontiguousarray(mono[:, None], dtype=np.float32)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """An audio file as float32 `[C, N]` and its sample rate; a ValueError names the file and the problem."""
    try:
        wav, sample_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors come in several types; all mean "unreadable"
        raise ValueError(f"cannot read audio prompt {path} ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if wav.shape[0] == 0:
        raise ValueError(f"audio prompt {path} is empty")
    if not np.all(np.isfinite(wav)):
        raise ValueError(f"audio prompt {path} contains NaN or Inf samples")
    return np.ascontiguousarray(wav.T), int(sample_rate)
