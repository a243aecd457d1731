"""The reference chains of the paper's metrics as audiocraft runs them (for parity tests and benchmarks)."""

import numpy as np


def fad_tool_examples(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """One clip `[N]` -> the log-mel examples `[W, 96, 64]` the FAD tool feeds VGGish when audiocraft runs it.

    audiocraft (metrics/fad.py): `convert_audio` to 16 kHz mono, `audio_write(strategy="peak")` through ffmpeg's
    pcm_s16le (float -> int16 is `round(x * 2**15)`, clipped). The tool (create_embeddings_beam.py, ReadWavFiles +
    audioset_model.AudioSetModel.extract_features with its defaults, step 8000): the int16 samples as floats,
    divided by max(0.1, max), 1 s windows every 8000 samples, each window's log-mel framed into 0.96 s examples,
    with mel_features (torchvggish ships the same module as tensorflow_models.audioset).
    """
    import torch
    from audiocraft.data.audio_utils import convert_audio, normalize_audio
    from torchvggish import mel_features
    from torchvggish import vggish_params as params

    mono = convert_audio(torch.from_numpy(wav)[None, None], sample_rate, params.SAMPLE_RATE, 1)[0]  # [1, N16]
    peaked = normalize_audio(mono, normalize=True, strategy="peak", peak_clip_headroom_db=1)
    pcm = np.clip(np.rint(peaked.numpy()[0] * 2**15), -(2**15), 2**15 - 1).astype(np.int16)
    samples = pcm.astype(np.float64)
    samples /= np.maximum(0.1, np.amax(samples))
    window_frames = round(params.EXAMPLE_WINDOW_SECONDS / params.STFT_HOP_LENGTH_SECONDS)
    examples = [np.zeros((0, window_frames, params.NUM_BANDS))]
    for start in range(0, samples.shape[0] - params.SAMPLE_RATE + 1, 8000):
        log_mel = mel_features.log_mel_spectrogram(
            samples[start : start + params.SAMPLE_RATE],
            audio_sample_rate=params.SAMPLE_RATE,
            log_offset=params.LOG_OFFSET,
            window_length_secs=params.STFT_WINDOW_LENGTH_SECONDS,
            hop_length_secs=params.STFT_HOP_LENGTH_SECONDS,
            num_mel_bins=params.NUM_MEL_BINS,
            lower_edge_hertz=params.MEL_MIN_HZ,
            upper_edge_hertz=params.MEL_MAX_HZ,
        )
        examples.append(mel_features.frame(log_mel, window_length=window_frames, hop_length=window_frames))
    return np.concatenate(examples)
