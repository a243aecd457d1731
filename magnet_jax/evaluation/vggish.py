"""VGGish in Flax Linen, with the front end of the FAD reference that audiocraft runs, and its weight loaders.

FAD as MAGNeT and audiocraft report it (audiocraft/metrics/fad.py) is computed by Google's TensorFlow tool
(google-research frechet_audio_distance/create_embeddings_beam.py, audioset_model.py) on 16 kHz WAV files that
audiocraft writes. `embed_vggish` reproduces that chain on arrays:

1. `resample` to 16 kHz with julius (audiocraft's `convert_audio`), then the clip is written with
   `audio_write(strategy="peak")`: scaled to a peak of -1 dB, stored as 16-bit PCM (ffmpeg's float -> s16:
   `round(x * 2**15)`, clipped). The tool reads the integer samples and divides them by
   `max(0.1, max(samples))` (its loudness normalisation; the positive maximum, not the absolute one).
   `fad_normalize` does these steps; a silent clip stays silent (audiocraft would write NaNs). The int16 step
   makes the chain sensitive to float32 rounding before it: a 4e-7 difference between two resamplers flips
   the rounding of ~1% of the samples, which moves the log-mel of near-empty bands by up to ~1e-2.
2. 1 s windows (16000 samples) every 0.5 s (the tool's `--model_step_size` default, 8000, which audiocraft
   keeps); a clip shorter than 1 s gives no window. Each window's log-mel spectrogram (25 ms periodic-Hann
   window, 10 ms hop, 512-point FFT magnitude, 64 HTK mel bands 125-7500 Hz, `log(mel + 0.01)`) is framed
   into non-overlapping 0.96 s examples, of which a 1 s window holds exactly one: [96 frames, 64 bands].
   The window hop is a whole number of STFT hops, so the examples are cut from one log-mel of the whole clip.
   Steps 1-2 run on the host, the log-mel in float64 as the tool computes it (in float32, quiet bands are off
   by 4e-5 of the range); resampling and the network (step 3) run jitted.
3. The VGG network's `vggish/embedding` tensor: the 128-d fc2 output *before* any activation
   (tensorflow/models research/audioset/vggish/vggish_slim.py, `activation_fn=None`). No PCA, no quantisation.

The released weights read here are the PyTorch port's (harritaylor/torchvggish): `vggish-10086976.pth` (VGG
state dict) and `vggish_pca_params-970ea276.pth` (the PCA of Google's `vggish_pca_params.npz`, which is read
too). torchvggish's network ends with a ReLU on fc2 (the TF graph it was ported from had one); the FAD tool
uses the pre-activation output, so `VGGish` returns that and `jax.nn.relu` of it is torchvggish's output.
`postprocess` is the AudioSet release's PCA whitening + 8-bit quantisation (vggish_postprocess.py), applied to
the embedding it is given; it is available with `embed_vggish(..., pca=...)` but is not part of FAD.

  params = load_vggish("vggish-10086976.pth")
  embed_vggish(params, audio [B, N], sample_rate) -> [B, W, 128], W = (N16 - 16000) // 8000 + 1 windows
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.checkpoints.weights import check_state_dict, load_torch_pickle
from magnet_jax.evaluation.audio import resample, resampled_length
from magnet_jax.fileio import WeightsError, local_file

SAMPLE_RATE = 16_000
STFT_WINDOW = 400  # 25 ms
STFT_HOP = 160  # 10 ms
FFT_SIZE = 512  # next power of two of the window
NUM_BANDS = 64
MEL_MIN_HZ, MEL_MAX_HZ = 125.0, 7500.0
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96  # 0.96 s
EMBEDDING_SIZE = 128
FAD_WINDOW = SAMPLE_RATE  # the FAD tool embeds 1 s windows ...
FAD_STEP = 8_000  # ... every 0.5 s
PEAK_HEADROOM_DB = 1.0  # audiocraft's audio_write(strategy="peak")
MIN_AMPLITUDE = 0.1  # the FAD tool's loudness normalisation floor (in the units of the samples it reads)

# Our layer names (the TF scopes) -> the torchvggish state dict prefixes.
TORCH_NAMES = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3_1": "features.6",
    "conv3_2": "features.8",
    "conv4_1": "features.11",
    "conv4_2": "features.13",
    "fc1_1": "embeddings.0",
    "fc1_2": "embeddings.2",
    "fc2": "embeddings.4",
}
_CONVS = (
    ("conv1", 64, True),
    ("conv2", 128, True),
    ("conv3_1", 256, False),
    ("conv3_2", 256, True),
    ("conv4_1", 512, False),
    ("conv4_2", 512, True),
)  # (name, channels, max-pool after)
_FLAT = 6 * 4 * 512  # [96, 64] after four 2x2 pools, NHWC-flattened
_FCS = (("fc1_1", _FLAT, 4096), ("fc1_2", 4096, 4096), ("fc2", 4096, EMBEDDING_SIZE))


class VGGish(nn.Module):
    """Log-mel examples `[B, 96, 64]` -> pre-activation embeddings `[B, 128]` (vggish_slim.py)."""

    @nn.compact
    def __call__(self, examples: jax.Array) -> jax.Array:
        x = examples[..., None]
        for name, channels, pool in _CONVS:
            x = nn.relu(nn.Conv(channels, (3, 3), padding="SAME", name=name)(x))
            if pool:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        for name, _, width in _FCS[:-1]:
            x = nn.relu(nn.Dense(width, name=name)(x))
        return nn.Dense(EMBEDDING_SIZE, name=_FCS[-1][0])(x)


# ---- front end ------------------------------------------------------------------------------------------


def _hz_to_mel(hz):
    return 1127.0 * np.log(1.0 + hz / 700.0)


@functools.cache
def mel_matrix() -> np.ndarray:
    """`[257, 64]` float64 weights taking FFT magnitudes to HTK mel bands (mel_features.spectrogram_to_mel_matrix)."""
    bins_mel = _hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1))
    edges = np.linspace(_hz_to_mel(MEL_MIN_HZ), _hz_to_mel(MEL_MAX_HZ), NUM_BANDS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # no weight on the DC bin (HTK)
    return weights


def log_mel_spectrogram(audio: np.ndarray) -> np.ndarray:
    """16 kHz audio `[B, N]` (N >= 400) -> log-mel `[B, 1 + (N - 400) // 160, 64]` float64 (mel_features.py)."""
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(audio, np.float64), STFT_WINDOW, axis=-1)
    frames = frames[..., ::STFT_HOP, :]
    window = 0.5 - 0.5 * np.cos(2 * np.pi / STFT_WINDOW * np.arange(STFT_WINDOW))  # periodic Hann
    spectrum = np.abs(np.fft.rfft(frames * window, n=FFT_SIZE))
    return np.log(spectrum @ mel_matrix() + LOG_OFFSET)


def fad_windows(num_samples: int) -> int:
    """How many 1 s windows (0.5 s apart) the FAD tool embeds from a 16 kHz clip of `num_samples`."""
    return 0 if num_samples < FAD_WINDOW else (num_samples - FAD_WINDOW) // FAD_STEP + 1


def fad_normalize(audio: np.ndarray) -> np.ndarray:
    """16 kHz `[B, N]` -> what the FAD tool embeds: peak -1 dB, 16-bit PCM, divided by max(0.1, max) (step 1)."""
    audio = np.asarray(audio, np.float32)  # float32 like audiocraft's normalize_audio and ffmpeg's input
    peak = np.max(np.abs(audio), axis=-1, keepdims=True)
    scaled = audio * (np.float32(10 ** (-PEAK_HEADROOM_DB / 20)) / np.where(peak > 0, peak, np.float32(1.0)))
    pcm = np.clip(np.rint(scaled * np.float32(2**15)), -(2**15), 2**15 - 1).astype(np.float64)
    return pcm / np.maximum(MIN_AMPLITUDE, np.max(pcm, axis=-1, keepdims=True))


def fad_examples(audio: np.ndarray) -> np.ndarray:
    """Normalised 16 kHz `[B, N]` -> log-mel examples `[B, W, 96, 64]` float32, one per FAD window (step 2)."""
    windows = fad_windows(audio.shape[-1])
    if windows == 0:
        return np.zeros((audio.shape[0], 0, EXAMPLE_FRAMES, NUM_BANDS), np.float32)
    log_mel = log_mel_spectrogram(audio[..., : (windows - 1) * FAD_STEP + FAD_WINDOW])
    hop = FAD_STEP // STFT_HOP
    index = hop * np.arange(windows)[:, None] + np.arange(EXAMPLE_FRAMES)
    return log_mel[:, index].astype(np.float32)


# ---- embeddings -----------------------------------------------------------------------------------------


class VggishPca(NamedTuple):
    """PCA of the AudioSet embedding release: `eigen_vectors` `[128, 128]` (rows), `means` `[128]`."""

    eigen_vectors: jax.Array
    means: jax.Array


def postprocess(embeddings: jax.Array, pca: VggishPca) -> jax.Array:
    """`[..., 128]` -> PCA-whitened, clipped to [-2, 2] and quantised to 0..255 (float; vggish_postprocess.py)."""
    projected = jnp.einsum(
        "...d,ed->...e", embeddings - pca.means, pca.eigen_vectors, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.round((jnp.clip(projected, -2.0, 2.0) + 2.0) * (255.0 / 4.0))


@functools.partial(jax.jit, static_argnums=1)
def _to_16k(audio: jax.Array, sample_rate: int) -> jax.Array:
    return resample(jnp.asarray(audio, jnp.float32), sample_rate, SAMPLE_RATE)


@jax.jit
def _network(params, examples: jax.Array, pca: VggishPca | None) -> jax.Array:
    batch, windows = examples.shape[:2]
    embeddings = VGGish().apply({"params": params}, examples.reshape(batch * windows, EXAMPLE_FRAMES, NUM_BANDS))
    embeddings = embeddings.reshape(batch, windows, EMBEDDING_SIZE)
    return embeddings if pca is None else postprocess(embeddings, pca)


def embed_vggish(
    params, audio, sample_rate: int, pca: VggishPca | None = None, *, sharding: jax.sharding.Sharding | None = None
) -> np.ndarray:
    """Mono audio `[B, N]` at `sample_rate` -> the FAD reference's VGGish embeddings `[B, W, 128]` float32.

    W = `vggish_windows(N, sample_rate)` (0 below 1 s). Resampling (float32, as julius) and the network run
    jitted; the normalisation and log-mel run on the host in float64, as the FAD tool computes them (a float32
    spectrogram is 4e-5 off in quiet bands). With `pca`, the embeddings are post-processed (`postprocess`) as
    in the AudioSet release; FAD uses them without (`pca=None`). `sharding` places the network's input (rows over
    devices: B a multiple of their count); the network then runs data parallel.
    """
    examples = fad_examples(fad_normalize(np.asarray(_to_16k(audio, int(sample_rate)))))
    if examples.shape[1] == 0:
        return np.zeros((examples.shape[0], 0, EMBEDDING_SIZE), np.float32)
    if sharding is not None:
        examples = jax.device_put(examples, sharding)
    return np.asarray(_network(params, examples, pca))


def vggish_windows(num_samples: int, sample_rate: int) -> int:
    """W of `embed_vggish` for a clip of `num_samples` at `sample_rate`."""
    return fad_windows(resampled_length(num_samples, sample_rate, SAMPLE_RATE))


# ---- weights --------------------------------------------------------------------------------------------


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """torchvggish state dict name -> shape (the VGG of `vggish-10086976.pth`)."""
    shapes, channels = {}, 1
    for name, width, _ in _CONVS:
        shapes[f"{TORCH_NAMES[name]}.weight"] = (width, channels, 3, 3)
        shapes[f"{TORCH_NAMES[name]}.bias"] = (width,)
        channels = width
    for name, fan_in, width in _FCS:
        shapes[f"{TORCH_NAMES[name]}.weight"] = (width, fan_in)
        shapes[f"{TORCH_NAMES[name]}.bias"] = (width,)
    return shapes


def params_from_state_dict(state, *, source: str) -> dict:
    """A torchvggish VGG state dict (checked) -> `VGGish` params (conv kernels HWIO, dense kernels [in, out])."""
    check_state_dict(state, expected_shapes(), source=source)
    params = {}
    for name, torch_name in TORCH_NAMES.items():
        weight = np.asarray(state[f"{torch_name}.weight"], np.float32)
        kernel = weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
        params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(state[f"{torch_name}.bias"], jnp.float32)}
    return params


def load_vggish(path: str | os.PathLike) -> dict:
    """Reads torchvggish's `vggish-10086976.pth` into `VGGish` params (keys and shapes checked)."""
    what = "VGGish weights"
    state = load_torch_pickle(local_file(path, what=what), what=what)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return params_from_state_dict(state, source=str(path))


def load_vggish_pca(path: str | os.PathLike) -> VggishPca:
    """Reads the PCA parameters: torchvggish's `vggish_pca_params-970ea276.pth` or Google's `.npz`."""
    what = "VGGish PCA parameters"
    path = str(local_file(path, what=what))
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                state = dict(npz)
        except Exception as e:
            raise WeightsError(f"{what}: cannot read {path} as .npz: {str(e).splitlines()[0]}") from e
    else:
        state = load_torch_pickle(path, what=what, allow_numpy=True)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of PCA parameters, found {type(state).__name__}")
    state = dict(state)
    if "pca_means" in state and np.shape(state["pca_means"]) == (EMBEDDING_SIZE, 1):  # torchvggish's layout
        state["pca_means"] = np.reshape(state["pca_means"], (EMBEDDING_SIZE,))
    check_state_dict(
        state, {"pca_eigen_vectors": (EMBEDDING_SIZE, EMBEDDING_SIZE), "pca_means": (EMBEDDING_SIZE,)}, source=path
    )
    return VggishPca(jnp.asarray(state["pca_eigen_vectors"], jnp.float32), jnp.asarray(state["pca_means"], jnp.float32))
