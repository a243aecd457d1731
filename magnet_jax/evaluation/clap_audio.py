"""LAION-CLAP's audio tower in Flax Linen: HTS-AT (laion_clap/clap_module/htsat.py, non-fusion) with its front end.

1. Front end (torchlibrosa 0.1.0 as HTS-AT builds it): reflect-padded STFT (n_fft 1024, hop 480, periodic Hann
   window), power, librosa's Slaney mel bank (64 bands, 50 Hz - 14 kHz), 10 log10(max(., 1e-10)) -> [1001 frames,
   64] for a 10 s clip at 48 kHz; `bn0` (BatchNorm over the mel bands, running statistics); `reshape_wav2img`:
   bicubic interpolation (align_corners, A = -0.75) of the time axis to 1024 frames, then the four 256-frame
   quarters stacked along the frequency axis into a 256 x 256 image (row = quarter * 64 + band, column = frame).
2. The Swin transformer (4x4 patches, windows of 8, shifted windows in odd blocks, relative position bias, patch
   merging between stages); the embedding is the mean over tokens of the final LayerNorm (`latent_output`); the
   classification heads (`tscam_conv`, `head`) are unused. Then `audio_projection` and L2 normalisation.

Param tree (names follow the torch state dict, `a.N` -> `a_N`; see `clap.torch_key`): `audio_branch/{bn0/{weight,
bias,running_mean,running_var}, patch_embed/{proj,norm}, layers_{i}/{blocks_{j}/{norm1, attn/{qkv, proj,
relative_position_bias_table}, norm2, mlp/{fc1,fc2}}, downsample/{norm,reduction}}, norm}`, `audio_projection_0`,
`audio_projection_2`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.evaluation.clap_text import l2_normalize, layer_norm, project

SAMPLE_RATE = 48_000
CLIP_SAMPLES = 480_000  # 10 s: laion_clap's max_len for the non-fusion model
N_FFT = 1024
HOP = 480
MEL_BINS = 64
FMIN, FMAX = 50.0, 14_000.0
AMIN = 1e-10  # power_to_db floor (ref 1.0, no top_db)
SPEC_SIZE = 256  # HTS-AT's square input image
FREQ_RATIO = SPEC_SIZE // MEL_BINS  # 4 time quarters stacked along frequency
PATCH = 4
NORM_EPS = 1e-5  # torch LayerNorm / BatchNorm default


@dataclasses.dataclass(frozen=True)
class HtsatConfig:
    """`create_htsat_model` presets: base (the defaults), tiny (embed_dim 96, depths 2,2,6,2), large (256)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 12, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    mlp_ratio: float = 4.0

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


# ---- front end --------------------------------------------------------------------------------------------------

_MEL_STEP_HZ = 200.0 / 3  # Slaney's mel scale (librosa, htk=False): linear below 1 kHz (15 mels), log above
_MEL_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    return 15.0 + math.log(hz / 1000.0) / _MEL_LOG_STEP if hz >= 1000.0 else hz / _MEL_STEP_HZ


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel >= 15.0, 1000.0 * np.exp(_MEL_LOG_STEP * (mel - 15.0)), _MEL_STEP_HZ * mel)


@functools.cache
def mel_filterbank() -> np.ndarray:
    """`[513, 64]` float32: librosa.filters.mel(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T (Slaney
    triangles, area-normalised), torchlibrosa's `melW`."""
    fft_hz = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    edges = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), MEL_BINS + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


def _hann() -> np.ndarray:
    """The periodic Hann window of N_FFT samples (scipy's get_window("hann", fftbins=True)), float64."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)


@functools.cache
def stft_kernels() -> tuple[np.ndarray, np.ndarray]:
    """torchlibrosa's frozen STFT `conv_real` / `conv_imag` weights `[513, 1, 1024]`: cos and -sin of the DFT times
    the window (what `mel_power` computes with an FFT)."""
    phase = 2 * np.pi * np.outer(np.arange(N_FFT // 2 + 1), np.arange(N_FFT)) / N_FFT
    return (
        (np.cos(phase) * _hann())[:, None].astype(np.float32),
        (-np.sin(phase) * _hann())[:, None].astype(np.float32),
    )


def mel_power(waveform: jax.Array) -> jax.Array:
    """`[B, 480000]` 48 kHz audio -> `[B, 1001, 64]` mel power: torchlibrosa's Spectrogram (reflect-padded, Hann)
    times `melW`, here with a float32 FFT."""
    padded = jnp.pad(waveform, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    num_frames = waveform.shape[-1] // HOP + 1
    frames = padded[:, np.arange(num_frames)[:, None] * HOP + np.arange(N_FFT)[None, :]]  # [B, T, 1024]
    spectrum = jnp.fft.rfft(frames * jnp.asarray(_hann(), jnp.float32), axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    return jnp.matmul(power, jnp.asarray(mel_filterbank()), precision=jax.lax.Precision.HIGHEST)


def log_mel(waveform: jax.Array) -> jax.Array:
    """`[B, 480000]` -> `[B, 1001, 64]` log-mel in dB (LogmelFilterBank's power_to_db: ref 1, amin 1e-10).

    In float32 any STFT is exact to ~1e-7 of a frame's amplitude, so bands ~100 dB below a clip's peak carry
    ~0.01 dB of rounding (torchlibrosa's conv STFT too); the network does not see it (embeddings agree to 1e-6).
    """
    return 10.0 * jnp.log10(jnp.maximum(mel_power(waveform), AMIN))


@functools.cache
def _bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights `[out, 4]` of torch's bicubic upsampling (align_corners=True, A=-0.75), float32
    as torch computes them on CPU; indices clamped to the edges."""
    a = np.float32(-0.75)
    scale = np.float32(in_size - 1) / np.float32(out_size - 1)
    src = scale * np.arange(out_size, dtype=np.float32)
    base = np.floor(src)
    t = np.clip(src - base, np.float32(0), np.float32(1))

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    weights = np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=1).astype(np.float32)
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return index, weights


def spectrogram_image(mel: jax.Array) -> jax.Array:
    """`[B, T <= 1024, 64]` normalised log-mel -> `[B, 256, 256, 1]` HTS-AT image (`reshape_wav2img`)."""
    target = SPEC_SIZE * FREQ_RATIO
    if mel.shape[1] < target:
        index, weights = _bicubic_taps(mel.shape[1], target)
        mel = jnp.einsum("btkf,tk->btf", mel[:, index], jnp.asarray(weights), precision=jax.lax.Precision.HIGHEST)
    b = mel.shape[0]
    image = jnp.swapaxes(mel, 1, 2).reshape(b, MEL_BINS, FREQ_RATIO, SPEC_SIZE)  # [B, F, quarter, frame]
    return jnp.swapaxes(image, 1, 2).reshape(b, SPEC_SIZE, SPEC_SIZE, 1)


# ---- HTS-AT -----------------------------------------------------------------------------------------------------


class FrozenBatchNorm(nn.Module):
    """BatchNorm in eval mode over the last axis, params named as torch's (`weight`, `bias`, `running_*`)."""

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = self.param("running_mean", nn.initializers.zeros, (features,))
        var = self.param("running_var", nn.initializers.ones, (features,))
        return (x - mean) * jax.lax.rsqrt(var + NORM_EPS) * weight + bias


@functools.cache
def _relative_position_index(window: int) -> np.ndarray:
    """`[N, N]` index into the `(2w-1)^2` bias table for the N = w*w tokens of a window (Swin)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@functools.cache
def _shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """`[nW, N, N]` additive mask of shifted windows: -100 between tokens from different regions (Swin)."""
    regions = np.zeros((height, width), np.int64)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bounds for ws in bounds):
        regions[hs, ws] = i
    windows = _partition(regions[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
    return np.where(windows[:, None, :] != windows[:, :, None], -100.0, 0.0).astype(np.float32)


def _partition(x, window: int):
    """`[B, H, W, C]` -> `[B, nW, window*window, C]`, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def _merge(windows, window: int, height: int, width: int):
    """Inverse of `_partition`."""
    b, _, _, c = windows.shape
    x = windows.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows `[B, nW, N, C]`, with the learned relative position bias."""

    num_heads: int
    window: int

    @nn.compact
    def __call__(self, x, mask):
        b, nw, n, c = x.shape
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        scores = jnp.einsum("bwqhd,bwkhd->bwhqk", q * (c // self.num_heads) ** -0.5, k)
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * self.window - 1) ** 2, self.num_heads),
        )
        scores = scores + jnp.transpose(table[_relative_position_index(self.window)], (2, 0, 1))
        if mask is not None:
            scores = scores + jnp.asarray(mask)[None, :, None]
        out = jnp.einsum("bwhqk,bwkhd->bwqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, nw, n, c)
        return nn.Dense(c, name="proj")(out)


class Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        return nn.Dense(x.shape[-1], name="fc2")(h)


class SwinBlock(nn.Module):
    """`[B, H, W, C] -> [B, H, W, C]`; windows as large as the map (and no shift) once the map is that small."""

    num_heads: int
    window: int
    shift: int
    mlp_ratio: float

    @nn.compact
    def __call__(self, x):
        _, height, width, c = x.shape
        window, shift = self.window, self.shift
        if min(height, width) <= window:
            window, shift = min(height, width), 0
        h = layer_norm(NORM_EPS, "norm1")(x)
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        mask = _shift_mask(height, width, window, shift) if shift else None
        h = _merge(
            WindowAttention(self.num_heads, window, name="attn")(_partition(h, window), mask), window, height, width
        )
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        x = x + h
        return x + Mlp(int(c * self.mlp_ratio), name="mlp")(layer_norm(NORM_EPS, "norm2")(x))


class PatchMerging(nn.Module):
    """`[B, H, W, C] -> [B, H/2, W/2, 2C]`: 2x2 neighbours concatenated (order (0,0), (1,0), (0,1), (1,1))."""

    @nn.compact
    def __call__(self, x):
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return nn.Dense(x.shape[-1] // 2, use_bias=False, name="reduction")(layer_norm(NORM_EPS, "norm")(x))


class SwinStage(nn.Module):
    config: HtsatConfig
    index: int

    @nn.compact
    def __call__(self, x):
        c = self.config
        for j in range(c.depths[self.index]):
            x = SwinBlock(
                c.num_heads[self.index],
                c.window_size,
                0 if j % 2 == 0 else c.window_size // 2,
                c.mlp_ratio,
                name=f"blocks_{j}",
            )(x)
        if self.index < len(c.depths) - 1:
            x = PatchMerging(name="downsample")(x)
        return x


class PatchEmbed(nn.Module):
    embed_dim: int

    @nn.compact
    def __call__(self, image):
        x = nn.Conv(self.embed_dim, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID", name="proj")(image)
        return layer_norm(NORM_EPS, "norm")(x)


class Htsat(nn.Module):
    """`[B, 480000]` 48 kHz audio -> `[B, num_features]` HTS-AT embedding (`output_dict["embedding"]`, eval)."""

    config: HtsatConfig

    @nn.compact
    def __call__(self, waveform: jax.Array) -> jax.Array:
        x = spectrogram_image(FrozenBatchNorm(name="bn0")(log_mel(waveform)))
        x = PatchEmbed(self.config.embed_dim, name="patch_embed")(x)
        for i in range(len(self.config.depths)):
            x = SwinStage(self.config, i, name=f"layers_{i}")(x)
        return jnp.mean(layer_norm(NORM_EPS, "norm")(x), axis=(1, 2))


class ClapAudio(nn.Module):
    """`[B, 480000]` 48 kHz audio -> `[B, joint]` L2-normalised CLAP audio embeddings (`CLAP.get_audio_embedding`)."""

    config: HtsatConfig
    joint_dim: int = 512

    @nn.compact
    def __call__(self, waveform: jax.Array) -> jax.Array:
        embedding = Htsat(self.config, name="audio_branch")(waveform)
        return l2_normalize(project(embedding, self.joint_dim, "audio_projection"))
