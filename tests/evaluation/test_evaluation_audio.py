"""The metrics' resampler vs julius (audiocraft's convert_audio), and reading audio files."""

import julius
import numpy as np
import pytest
import torch

from magnet_jax.data.audio import AudioError, audio_files, read_audio
from magnet_jax.evaluation.audio import resample, resampled_length
from references.parity import relative_error


@pytest.mark.parametrize(
    "from_rate,to_rate", [(44_100, 16_000), (44_100, 32_000), (32_000, 16_000), (48_000, 32_000), (16_000, 32_000)]
)
def test_resample_matches_julius(clips_44k, from_rate, to_rate):
    audio = clips_44k[0][:, : 44_100 + 37]  # a length the rate ratio does not divide
    ref = julius.resample_frac(torch.from_numpy(audio), from_rate, to_rate).numpy()
    ours = np.asarray(resample(audio, from_rate, to_rate))
    assert ours.shape == ref.shape == (3, resampled_length(audio.shape[1], from_rate, to_rate))
    assert relative_error(ours, ref) < 1e-6


def test_resample_same_rate_is_identity(clips_32k):
    np.testing.assert_array_equal(resample(clips_32k[0], 32_000, 32_000), clips_32k[0])
    with pytest.raises(ValueError, match="positive integers"):
        resample(clips_32k[0], 32_000.5, 16_000)


def test_read_audio(clips_44k, tmp_path):
    audio, paths = clips_44k
    wav, sr = read_audio(paths[0])
    assert sr == 44_100 and wav.dtype == np.float32 and wav.shape == (1, audio.shape[1])
    np.testing.assert_allclose(wav[0], audio[0], atol=1 / 2**15)  # the corpus writes 16-bit PCM
    assert audio_files(paths[0].parent) == sorted(paths)
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioError, match=r"broken.wav: cannot read audio \(") as e:
        read_audio(tmp_path / "broken.wav")
    assert "\n" not in str(e.value)
    with pytest.raises(AudioError, match="missing.flac: cannot read audio"):
        read_audio(tmp_path / "missing.flac")
    with pytest.raises(AudioError, match="not a directory"):
        audio_files(tmp_path / "nowhere")
