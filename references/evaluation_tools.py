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


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """A plausible random value for a released state-dict entry: LayerNorm/BatchNorm scales near 1, small biases,
    fan-in-scaled weights, BatchNorm statistics of a log-mel input."""
    import torch

    if name.endswith("running_mean"):
        value = -40.0 + 10.0 * rng.standard_normal(shape)
    elif name.endswith("running_var"):
        value = rng.uniform(10.0, 25.0, shape) ** 2
    elif name.endswith(".bias"):
        value = 0.05 * rng.standard_normal(shape)
    elif len(shape) == 1:
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))
    return torch.from_numpy(np.asarray(value, np.float32))


def write_random_passt(path, config, seed: int = 0):
    """A random PaSST of architecture `config` (magnet_jax.evaluation.passt.PasstConfig) saved as hear21passt's
    released `.pt` state dict (the distillation head included)."""
    import torch

    from magnet_jax.evaluation import passt

    rng = np.random.default_rng(seed)
    shapes = {
        **passt.expected_shapes(config),
        "head_dist.weight": (config.num_classes, config.embed_dim),
        "head_dist.bias": (config.num_classes,),
    }
    state = {k: _random_tensor(k, shape, rng) for k, shape in shapes.items()}
    state["head.1.weight"] *= 3.0  # peaked label distributions
    torch.save(state, str(path))
    return path


def write_random_clap(path, config, seed: int = 0):
    """A random LAION-CLAP of architecture `config` (magnet_jax.evaluation.clap.ClapConfig) saved as the released
    training checkpoint (`{"epoch", "state_dict": {"module." + key}}`), with the real STFT and mel matrices."""
    import torch

    from magnet_jax.evaluation import clap
    from magnet_jax.evaluation.clap_audio import mel_filterbank, stft_kernels

    rng = np.random.default_rng(seed)
    front_end = dict(zip(clap.FRONT_END_KEYS, (*stft_kernels(), mel_filterbank())))
    state = {
        k: torch.from_numpy(np.asarray(front_end[k], np.float32)) if k in front_end else _random_tensor(k, shape, rng)
        for k, shape in clap.expected_shapes(config).items()
    }
    torch.save({"epoch": 15, "name": "random-test", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path
