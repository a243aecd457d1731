"""PaSST (Koutini et al., 2021) in Flax Linen: the AudioSet tagger behind audiocraft's KL metric, and its loader.

audiocraft's `PasstKLDivergenceMetric` (audiocraft/metrics/kld.py) loads hear21passt's
`get_basic_model(mode="logits")`; MusicGen and MAGNeT evaluate with `pretrained_length=20`
(config/solver/musicgen/default.yaml), i.e. `hear21passt.base20sec`: the `passt_20sec` network
(`passt-s-f128-20sec-p16-s10-ap.474-swa.pt`, 200 time positions) fed up to 20 s of 32 kHz audio.
`passt_label_probs` follows the metric exactly:

- each clip is cut to its length, resampled to 32 kHz with julius (`convert_audio`) and split into consecutive
  segments of at most 20 s, *not* padded; a segment of 0.15 s (4800 samples) or less is dropped;
- every segment gets its own label distribution, `softmax(logits)` over the 527 classes (a softmax, although
  PaSST is a multi-label sigmoid tagger: the metric's choice). The metric pairs these rows one to one between
  generated and reference audio; they are not averaged over a clip's segments.

The front end is hear21passt's `AugmentMelSTFT` in eval mode (models/preprocess.py): pre-emphasis
`x[n+1] - 0.97 x[n]` (one sample shorter), power STFT (n_fft 1024, 800-sample symmetric Hann window centred in
the frame, hop 320, centred with reflect padding), Kaldi mel banks (128 bins, 0-15000 Hz, `get_mel_banks` of
torchaudio.compliance.kaldi with no VTLN, a zero column for the Nyquist bin), `log(mel + 1e-5)`, then
`(x + 4.5) / 5`. The network is hear21passt's models/passt.py `PaSST` at inference (no patchout): 16x16 patches
with stride 10 over [128 mel, T frames], plus frequency and time positional embeddings (the time ones cut to
the patches present), class and distillation tokens with their own embeddings, pre-norm ViT blocks
(LayerNorm eps 1e-6, exact GELU), a final LayerNorm, and the head `Linear(LayerNorm(mean of the two tokens))`.

  params = load_passt("passt-s-f128-20sec-p16-s10-ap.474-swa.pt", PASST_20S)
  passt_label_probs(params, audio [B, N], sample_rate) -> LabelProbs(probs [S, 527], clip_index [S])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.checkpoints.weights import check_state_dict, load_torch_pickle
from magnet_jax.evaluation.audio import resample
from magnet_jax.fileio import WeightsError, local_file

SAMPLE_RATE = 32_000
N_FFT = 1024
WINDOW = 800
HOP = 320
N_MELS = 128
FMIN, FMAX = 0.0, 15_000.0  # hear21passt: fmax = sr // 2 - fmax_aug_range // 2 with fmax_aug_range = 2000
PREEMPHASIS = 0.97
LOG_OFFSET = 1e-5
MEL_SHIFT, MEL_SCALE = 4.5, 5.0  # "fast normalization": (log_mel + 4.5) / 5
MIN_SECONDS = 0.15  # kld.py: shorter segments are dropped


@dataclasses.dataclass(frozen=True)
class PasstConfig:
    """PaSST-S architecture and the segment length the KL metric feeds it (hashable: a static jit argument).

    Attributes:
      time_positions: time positional embeddings (input_tdim // stride: 99, 200 or 300 for 10, 20, 30 s).
      max_seconds: the metric's segment length (its `pretrained_length`).
    """

    time_positions: int = 200
    max_seconds: float = 20.0
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 527
    patch: int = 16
    stride: int = 10

    @property
    def freq_positions(self) -> int:
        return N_MELS // self.stride

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * SAMPLE_RATE)


PASST_10S = PasstConfig(time_positions=99, max_seconds=10.0)  # passt-s-f128-p16-s10-ap.476-swa.pt (hear21passt.base)
PASST_20S = PasstConfig(time_positions=200, max_seconds=20.0)  # passt-s-f128-20sec-p16-s10-ap.474-swa.pt
PASST_30S = PasstConfig(time_positions=300, max_seconds=30.0)  # passt-s-f128-30sec-p16-s10-ap.473-swa.pt


# ---- front end ------------------------------------------------------------------------------------------


@functools.cache
def kaldi_mel_banks(
    num_bins: int = N_MELS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    low_hz: float = FMIN,
    high_hz: float = FMAX,
) -> np.ndarray:
    """Kaldi's triangular mel filters `[num_bins, n_fft // 2 + 1]` float32, last (Nyquist) column zero.

    Bin m rises linearly in mel (1127 ln(1 + f / 700)) from mel_low + m d to 1 at mel_low + (m + 1) d and falls
    to 0 at mel_low + (m + 2) d, d = (mel_high - mel_low) / (num_bins + 1), sampled at k * sample_rate / n_fft;
    float32 arithmetic in torchaudio's order.
    """
    f32 = np.float32
    mel_low, mel_high = 1127.0 * math.log(1.0 + low_hz / 700.0), 1127.0 * math.log(1.0 + high_hz / 700.0)
    delta = f32((mel_high - mel_low) / (num_bins + 1))
    index = np.arange(num_bins, dtype=f32)[:, None]
    left, center, right = (f32(mel_low) + (index + f32(offset)) * delta for offset in (0, 1, 2))
    freqs = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    fft_mel = (f32(1127.0) * np.log(f32(1.0) + freqs / f32(700.0)))[None, :]
    rising = (fft_mel - left) / (center - left)
    falling = (right - fft_mel) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(rising, falling))
    return np.pad(banks, ((0, 0), (0, 1))).astype(f32)


def mel_frames(num_samples: int) -> int:
    """Mel frames of `mel_spectrogram` for `num_samples` of 32 kHz audio."""
    return 1 + (num_samples - 1) // HOP


def mel_spectrogram(audio: jax.Array) -> jax.Array:
    """32 kHz audio `[B, N]` (N > 512) -> normalised log-mel `[B, 128, 1 + (N - 1) // 320]` (see module doc)."""
    x = audio[..., 1:] - PREEMPHASIS * audio[..., :-1]
    x = jnp.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    frames = mel_frames(audio.shape[-1])
    index = HOP * np.arange(frames)[:, None] + np.arange(N_FFT)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / (WINDOW - 1))  # symmetric (periodic=False)
    side = (N_FFT - WINDOW) // 2
    window = np.pad(hann, (side, N_FFT - WINDOW - side)).astype(np.float32)
    spectrum = jnp.fft.rfft(x[..., index] * window, n=N_FFT)  # [B, T, 513]
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    mel = jnp.einsum("mk,btk->bmt", jnp.asarray(kaldi_mel_banks()), power, precision=jax.lax.Precision.HIGHEST)
    return (jnp.log(mel + LOG_OFFSET) + MEL_SHIFT) / MEL_SCALE


# ---- network --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, on `[B, N, D]`."""

    config: PasstConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, dim = x.shape
        head_dim = dim // cfg.num_heads
        h = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="norm1")(x)
        qkv = nn.Dense(3 * dim, name="qkv")(h).reshape(batch, length, 3, cfg.num_heads, head_dim)
        attended = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, N, H, Dh]
        x = x + nn.Dense(dim, name="proj")(attended.reshape(batch, length, dim))
        h = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="norm2")(x)
        h = nn.Dense(int(dim * cfg.mlp_ratio), name="fc1")(h)
        return x + nn.Dense(dim, name="fc2")(jax.nn.gelu(h, approximate=False))


class PaSST(nn.Module):
    """Normalised log-mel `[B, 128, T]` -> AudioSet logits `[B, num_classes]`."""

    config: PasstConfig

    @nn.compact
    def __call__(self, mel: jax.Array) -> jax.Array:
        cfg = self.config
        dim = cfg.embed_dim
        x = nn.Conv(dim, (cfg.patch, cfg.patch), strides=(cfg.stride, cfg.stride), padding="VALID", name="patch_embed")(
            mel[..., None]
        )  # [B, F', T', D]
        batch, freq, time, _ = x.shape
        if time > cfg.time_positions or freq != cfg.freq_positions:
            raise ValueError(
                f"PaSST input of {mel.shape[-1]} mel frames gives {freq}x{time} patches; the model has "
                f"{cfg.freq_positions}x{cfg.time_positions} positions (at most {cfg.max_seconds:g} s)"
            )
        init = nn.initializers.truncated_normal(0.02)
        time_pos = self.param("time_new_pos_embed", init, (cfg.time_positions, dim))
        freq_pos = self.param("freq_new_pos_embed", init, (cfg.freq_positions, dim))
        x = x + time_pos[None, None, :time] + freq_pos[None, :, None]
        x = x.reshape(batch, freq * time, dim)  # frequency-major, as torch's flatten of [B, D, F', T']
        token_pos = self.param("new_pos_embed", init, (2, dim))
        tokens = jnp.stack([self.param("cls_token", init, (dim,)), self.param("dist_token", init, (dim,))])
        x = jnp.concatenate([jnp.broadcast_to(tokens + token_pos, (batch, 2, dim)), x], axis=1)
        for i in range(cfg.depth):
            x = Block(cfg, name=f"blocks_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name="norm")(x)
        features = (x[:, 0] + x[:, 1]) / 2
        features = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="head_norm")(features)
        return nn.Dense(cfg.num_classes, name="head")(features)


@functools.partial(jax.jit, static_argnums=0)
def passt_logits(config: PasstConfig, params, audio: jax.Array) -> jax.Array:
    """32 kHz mono `[B, N]` (one segment each, at most `config.max_seconds`) -> logits `[B, num_classes]`."""
    return PaSST(config).apply({"params": params}, mel_spectrogram(jnp.asarray(audio, jnp.float32)))


@functools.partial(jax.jit, static_argnums=1)
def _resample_to_model(audio: jax.Array, from_rate: int) -> jax.Array:
    return resample(jnp.asarray(audio, jnp.float32), from_rate, SAMPLE_RATE)


class LabelProbs(NamedTuple):
    """Label distributions, one row per segment: `probs` `[S, num_classes]`, `clip_index` `[S]` (its clip)."""

    probs: np.ndarray
    clip_index: np.ndarray


def segment_bounds(num_samples: int, config: PasstConfig) -> list[tuple[int, int]]:
    """The metric's segments of a 32 kHz clip: consecutive `[start, end)` of at most `max_samples`, > 0.15 s."""
    min_samples = int(MIN_SECONDS * SAMPLE_RATE)
    bounds = [(s, min(s + config.max_samples, num_samples)) for s in range(0, num_samples, config.max_samples)]
    return [(s, e) for s, e in bounds if e - s > min_samples]


def passt_label_probs(
    params,
    audio,
    sample_rate: int,
    *,
    config: PasstConfig = PASST_20S,
    lengths=None,
    batch_size: int = 16,
    sharding: jax.sharding.Sharding | None = None,
) -> LabelProbs:
    """Mono clips `[B, N]` at `sample_rate` (valid lengths `lengths` `[B]`, default N) -> per-segment softmax.

    Rows are clip-major, segments in time order (`segment_bounds`); a clip of at most 0.15 s has none. Segments
    of equal length run together in jitted batches of `batch_size` (padded with silent rows, dropped after);
    `sharding` places each batch (rows over devices: `batch_size` a multiple of their count).
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be [B, N] mono, got shape {audio.shape}")
    lengths = np.full(len(audio), audio.shape[1]) if lengths is None else np.asarray(lengths)
    if lengths.shape != (len(audio),) or (lengths < 0).any() or (lengths > audio.shape[1]).any():
        raise ValueError(f"lengths must be [B] = [{len(audio)}] within 0..{audio.shape[1]}, got {lengths.tolist()}")
    segments = []  # (clip, 32 kHz samples)
    for length in sorted(set(lengths.tolist())):
        clips = np.flatnonzero(lengths == length)
        if length == 0:
            continue
        wav = np.asarray(_resample_to_model(audio[clips, :length], int(sample_rate)))
        for clip, row in zip(clips, wav):
            segments += [(int(clip), row[s:e]) for s, e in segment_bounds(row.shape[-1], config)]
    segments.sort(key=lambda item: item[0])  # stable: keeps each clip's segments in time order
    probs = np.zeros((len(segments), config.num_classes), np.float32)
    by_length: dict[int, list[int]] = {}
    for i, (_, wav) in enumerate(segments):
        by_length.setdefault(wav.shape[-1], []).append(i)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = np.zeros((batch_size, segments[chunk[0]][1].shape[-1]), np.float32)
            batch[: len(chunk)] = np.stack([segments[i][1] for i in chunk])
            if sharding is not None:
                batch = jax.device_put(batch, sharding)
            probs[chunk] = np.asarray(jax.nn.softmax(passt_logits(config, params, batch), axis=-1))[: len(chunk)]
    return LabelProbs(probs, np.asarray([clip for clip, _ in segments], np.int64))


# ---- weights --------------------------------------------------------------------------------------------

UNUSED_KEYS = ("head_dist.weight", "head_dist.bias")  # the distillation head: trained, not used at inference


def expected_shapes(config: PasstConfig) -> dict[str, tuple[int, ...]]:
    """hear21passt state dict name -> shape (the `.pt` files it downloads), head_dist excepted."""
    d, mlp = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    shapes = {
        "cls_token": (1, 1, d),
        "dist_token": (1, 1, d),
        "new_pos_embed": (1, 2, d),
        "freq_new_pos_embed": (1, d, config.freq_positions, 1),
        "time_new_pos_embed": (1, d, 1, config.time_positions),
        "patch_embed.proj.weight": (d, 1, config.patch, config.patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.0.weight": (d,),
        "head.0.bias": (d,),
        "head.1.weight": (config.num_classes, d),
        "head.1.bias": (config.num_classes,),
    }
    for i in range(config.depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "mlp.fc1.weight": (mlp, d),
                p + "mlp.fc1.bias": (mlp,),
                p + "mlp.fc2.weight": (d, mlp),
                p + "mlp.fc2.bias": (d,),
            }
        )
    return shapes


def params_from_state_dict(state, config: PasstConfig, *, source: str) -> dict:
    """A hear21passt PaSST state dict (checked against `config`) -> `PaSST` params."""
    check_state_dict(state, expected_shapes(config), source=source, ignore=UNUSED_KEYS)
    a = {k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k not in UNUSED_KEYS}

    def dense(prefix):
        return {"kernel": a[prefix + ".weight"].T, "bias": a[prefix + ".bias"]}

    def norm(prefix):
        return {"scale": a[prefix + ".weight"], "bias": a[prefix + ".bias"]}

    params = {
        "patch_embed": {
            "kernel": a["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
            "bias": a["patch_embed.proj.bias"],
        },
        "time_new_pos_embed": a["time_new_pos_embed"][0, :, 0, :].T,
        "freq_new_pos_embed": a["freq_new_pos_embed"][0, :, :, 0].T,
        "new_pos_embed": a["new_pos_embed"][0],
        "cls_token": a["cls_token"][0, 0],
        "dist_token": a["dist_token"][0, 0],
        "norm": norm("norm"),
        "head_norm": norm("head.0"),
        "head": dense("head.1"),
    }
    for i in range(config.depth):
        p = f"blocks.{i}."
        params[f"blocks_{i}"] = {
            "norm1": norm(p + "norm1"),
            "norm2": norm(p + "norm2"),
            "qkv": dense(p + "attn.qkv"),
            "proj": dense(p + "attn.proj"),
            "fc1": dense(p + "mlp.fc1"),
            "fc2": dense(p + "mlp.fc2"),
        }
    return params


def load_passt(path: str | os.PathLike, config: PasstConfig = PASST_20S) -> dict:
    """Reads a released hear21passt checkpoint (`passt-s-f128-20sec-p16-s10-ap.474-swa.pt`, ...) for `config`."""
    what = "PaSST weights"
    state = load_torch_pickle(local_file(path, what=what), what=what)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return params_from_state_dict(state, config, source=str(path))
