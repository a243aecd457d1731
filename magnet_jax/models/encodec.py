"""EnCodec audio tokenizer in Flax Linen (inference): SEANet encoder/decoder and residual vector quantizer.

MAGNeT tokenizes 32 kHz mono music with the EnCodec of docs/design.md §9 (strides 4·4·5·8, hop 640, 50 Hz,
4 codebooks × 2048, latent dim 128) and sound with a 16 kHz one (strides 2·4·5·8, hop 320); both are described
by an `EncodecConfig`. Weights come from `magnet_jax.checkpoints.encodec_weights.load_encodec` (weight norm folded at
load), or `init_encodec` builds a random codec with fitted codebooks for tests and the quickstart.

Public entry points (pure, jitted, `config` static):
  encode(config, params, wav [B, C, N]) -> codes [B, K, T] int32, T = ceil(N / hop)
  decode(config, params, codes [B, K, T]) -> wav [B, C, T * hop] float32
  round_trip(config, params, wav [B, C, N]) -> wav [B, C, N] float32: decode(encode(wav)), trimmed to N
  encode_long(config, params, wav, chunk_seconds) -> codes (host numpy), in fixed-size chunks
  decode_long(config, params, codes, chunk_frames=, context_frames=) -> wav, in overlapping fixed-size windows

Audio is [B, C, N] at the API (the PyTorch layout) and channels-last [B, N, C] inside. Parameter logical axes
(none of them is sharded: the codec is replicated): `conv_width`, `conv_in`, `conv_out` (conv kernels
[k, C_in, C_out], transposed convs too), `lstm_in`, `lstm_hidden`, `lstm_gates`, `codebook` (level), `card`
(entry), `latent` (D). Activations are constrained to ("batch", "length", None), so under a mesh the codec runs
data-parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PAD_MODES = ("constant", "reflect")
# Keys of a `codec` config section that are not architecture: the weights' source, the derived frame rate and the
# window long audio is encoded in.
LOCATION_FIELDS = ("source", "frame_rate", "chunk_seconds")
_ACT = ("batch", "length", None)


# Defaults of transformers' `EncodecConfig`: `save_pretrained` omits keys that equal them.
@dataclasses.dataclass(frozen=True)
class EncodecConfig:
    """EnCodec architecture (hashable: it is the static argument of the jitted entry points).

    Attributes:
      sample_rate: audio sample rate (Hz).
      ratios: up-sampling strides in decoder order, e.g. (8, 5, 4, 4); the encoder uses them reversed.
      n_filters: width of the first conv; doubles at every down-sampling.
      dimension: latent dimension D (also the codebook vector size).
      card: entries per codebook.
      n_q: number of residual quantizer levels K.
      channels: audio channels.
      num_lstm_layers: LSTM layers after the encoder convs / before the decoder convs (0: none).
      pad_mode: "constant" (zeros) or "reflect", used by every non-transposed conv.
      n_residual_layers: residual units per resolution (dilations dilation_base**j).
      compress: channel reduction inside residual units.
      kernel_size, last_kernel_size, residual_kernel_size: first conv, last conv, residual conv kernels.
      dilation_base: dilation growth between residual units.
      true_skip: identity shortcut in residual units (False: a 1×1 conv shortcut).
      dtype: compute dtype of convs and LSTM ("float32", "bfloat16"); params and the quantizer stay float32.
    """

    sample_rate: int
    ratios: tuple[int, ...]
    n_filters: int
    dimension: int
    card: int
    n_q: int
    channels: int = 1
    num_lstm_layers: int = 2
    pad_mode: str = "constant"
    n_residual_layers: int = 1
    compress: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_base: int = 2
    true_skip: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(int(r) for r in self.ratios))
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"EncodecConfig.pad_mode={self.pad_mode!r}: expected one of {', '.join(PAD_MODES)}")
        for name in (
            "sample_rate",
            "n_filters",
            "dimension",
            "card",
            "n_q",
            "channels",
            "compress",
            "kernel_size",
            "last_kernel_size",
            "residual_kernel_size",
            "dilation_base",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EncodecConfig.{name}={getattr(self, name)!r}: expected a positive integer")
        if not self.ratios or min(self.ratios) < 1:
            raise ValueError(f"EncodecConfig.ratios={self.ratios}: expected positive strides")
        jnp.dtype(self.dtype)  # raises TypeError for unknown names

    @property
    def hop_length(self) -> int:
        """Audio samples per code frame (product of the strides)."""
        return math.prod(self.ratios)

    @property
    def frame_rate(self) -> float:
        """Code frames per second (50.0 for both MAGNeT codecs)."""
        return self.sample_rate / self.hop_length

    @classmethod
    def from_config(cls, codec: Mapping[str, Any]) -> EncodecConfig:
        """From the `codec` section of `configs/magnet.py` (fields missing there take the dataclass defaults).

        The section also says where the codec comes from and how long audio is encoded (`LOCATION_FIELDS`); any
        other unknown key is an error, and a given `frame_rate` must be the one the strides imply.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(codec.keys()) - fields - set(LOCATION_FIELDS))
        if unknown:
            raise ValueError(f"codec config: unknown field(s) {', '.join(unknown)}")
        config = cls(**{k: codec[k] for k in codec.keys() if k in fields})
        if "frame_rate" in codec and float(codec["frame_rate"]) != config.frame_rate:
            raise ValueError(
                f"codec config: frame_rate={codec['frame_rate']} but sample_rate / prod(ratios) = {config.frame_rate:g}"
            )
        return config


# ------------------------------------------------------------------------------------------------------------
# Layers (channels-last [B, T, C])


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
    """A float32 parameter with logical axis names. The Linen initializer is zeros on purpose: the codec is
    inference-only, so its values come from `load_encodec` or `init_encodec`; `init` only defines the tree."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.zeros_init(), axes), shape)


def _pad_time(x: jax.Array, left: int, right: int, mode: str) -> jax.Array:
    """Pads the time axis of [B, T, C]; reflect on inputs shorter than the pad zero-extends first (as EnCodec)."""
    if mode == "constant":
        return jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    extra = max(0, max(left, right) - x.shape[1] + 1)
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    y = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return y[:, : y.shape[1] - extra]


class Conv1d(nn.Module):
    """Non-causal EnCodec conv: [B, T, C_in] -> [B, ceil(T / stride), C_out].

    Pads (k_eff - stride) split right = total // 2, left = the rest, plus extra right padding so the last window
    is full; the weight norm of the released models is folded into `kernel` [k, C_in, C_out] at load.
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    pad_mode: str = "constant"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(
            self, "kernel", (self.kernel_size, x.shape[-1], self.features), ("conv_width", "conv_in", "conv_out")
        )
        bias = _param(self, "bias", (self.features,), ("conv_out",))
        k_eff = (self.kernel_size - 1) * self.dilation + 1
        total = k_eff - self.stride
        n_frames = -(-(x.shape[1] - self.stride) // self.stride)  # ceil((T - k_eff + total) / stride)
        extra = n_frames * self.stride + k_eff - total - x.shape[1]
        right = total // 2
        pads = (total - right, right + extra)
        if self.pad_mode != "constant":
            x, pads = _pad_time(x, *pads, self.pad_mode), (0, 0)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            (self.stride,),
            [pads],
            rhs_dilation=(self.dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + bias.astype(self.dtype)


class ConvTranspose1d(nn.Module):
    """Non-causal EnCodec transposed conv: [B, T, C_in] -> [B, T * stride, C_out].

    PyTorch's ConvTranspose1d ([B, (T-1)·stride + k]) with (k - stride) trimmed, right = total // 2, left = the
    rest; the trim is folded into the padding of the equivalent dilated conv. `kernel` is [k, C_in, C_out].
    """

    features: int
    kernel_size: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(
            self, "kernel", (self.kernel_size, x.shape[-1], self.features), ("conv_width", "conv_in", "conv_out")
        )
        bias = _param(self, "bias", (self.features,), ("conv_out",))
        total = self.kernel_size - self.stride
        trim_right = total // 2
        trim_left = total - trim_right
        pads = (self.kernel_size - 1 - trim_left, self.kernel_size - 1 - trim_right)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            jnp.flip(kernel, 0).astype(self.dtype),
            (1,),
            [pads],
            lhs_dilation=(self.stride,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + bias.astype(self.dtype)


class ResidualUnit(nn.Module):
    """SEANet residual unit: x + conv_b(elu(conv_a(elu(x)))) (shortcut: identity or a 1×1 conv)."""

    config: EncodecConfig
    dim: int
    dilation: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        y = Conv1d(
            self.dim // c.compress,
            c.residual_kernel_size,
            dilation=self.dilation,
            pad_mode=c.pad_mode,
            dtype=dtype,
            name="conv_a",
        )(nn.elu(x))
        y = Conv1d(self.dim, 1, pad_mode=c.pad_mode, dtype=dtype, name="conv_b")(nn.elu(y))
        shortcut = x if c.true_skip else Conv1d(self.dim, 1, pad_mode=c.pad_mode, dtype=dtype, name="shortcut")(x)
        return shortcut + y


class LSTMLayer(nn.Module):
    """One LSTM layer over [B, T, D] (PyTorch gate order i, f, g, o; biases b_ih + b_hh folded into `bias`)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        w_in = _param(self, "input_kernel", (d, 4 * d), ("lstm_in", "lstm_gates"))
        w_rec = _param(self, "recurrent_kernel", (d, 4 * d), ("lstm_hidden", "lstm_gates"))
        bias = _param(self, "bias", (4 * d,), ("lstm_gates",))
        gates_in = jnp.einsum("btd,dg->tbg", x.astype(self.dtype), w_in.astype(self.dtype)) + bias.astype(self.dtype)
        w_rec = w_rec.astype(self.dtype)

        def step(carry, g_in):
            h, cell = carry
            i, f, g, o = jnp.split(g_in + h @ w_rec, 4, axis=-1)
            cell = nn.sigmoid(f) * cell + nn.sigmoid(i) * jnp.tanh(g)
            h = nn.sigmoid(o) * jnp.tanh(cell)
            return (h, cell), h

        zeros = jnp.zeros((x.shape[0], d), gates_in.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), gates_in)
        return jnp.swapaxes(hs, 0, 1)


class LSTM(nn.Module):
    """Stacked LSTM with a skip connection: [B, T, D] -> LSTM(x) + x."""

    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i in range(self.num_layers):
            y = LSTMLayer(self.dtype, name=f"layer_{i}")(y)
        return y + x


class EncoderBlock(nn.Module):
    """Residual units at width `dim`, then ELU and a strided conv to 2·dim (down-sampling by `ratio`)."""

    config: EncodecConfig
    dim: int
    ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        for j in range(c.n_residual_layers):
            x = ResidualUnit(c, self.dim, c.dilation_base**j, name=f"res_{j}")(x)
        x = Conv1d(
            2 * self.dim, 2 * self.ratio, self.ratio, pad_mode=c.pad_mode, dtype=jnp.dtype(c.dtype), name="down"
        )(nn.elu(x))
        return nn.with_logical_constraint(x, _ACT)


class DecoderBlock(nn.Module):
    """ELU and a transposed conv from `dim` to dim/2 (up-sampling by `ratio`), then residual units."""

    config: EncodecConfig
    dim: int
    ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = ConvTranspose1d(self.dim // 2, 2 * self.ratio, self.ratio, dtype=jnp.dtype(c.dtype), name="up")(nn.elu(x))
        for j in range(c.n_residual_layers):
            x = ResidualUnit(c, self.dim // 2, c.dilation_base**j, name=f"res_{j}")(x)
        return nn.with_logical_constraint(x, _ACT)


class SEANetEncoder(nn.Module):
    """Audio [B, N, C] -> latents [B, ceil(N / hop), D]."""

    config: EncodecConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        x = Conv1d(c.n_filters, c.kernel_size, pad_mode=c.pad_mode, dtype=dtype, name="conv_in")(x)
        for i, ratio in enumerate(reversed(c.ratios)):
            x = EncoderBlock(c, c.n_filters * 2**i, ratio, name=f"block_{i}")(x)
        if c.num_lstm_layers:
            x = LSTM(c.num_lstm_layers, dtype, name="lstm")(x)
        return Conv1d(c.dimension, c.last_kernel_size, pad_mode=c.pad_mode, dtype=dtype, name="conv_out")(nn.elu(x))


class SEANetDecoder(nn.Module):
    """Latents [B, T, D] -> audio [B, T * hop, C]."""

    config: EncodecConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        width = c.n_filters * 2 ** len(c.ratios)
        x = Conv1d(width, c.kernel_size, pad_mode=c.pad_mode, dtype=dtype, name="conv_in")(z)
        if c.num_lstm_layers:
            x = LSTM(c.num_lstm_layers, dtype, name="lstm")(x)
        for i, ratio in enumerate(c.ratios):
            x = DecoderBlock(c, width // 2**i, ratio, name=f"block_{i}")(x)
        return Conv1d(c.channels, c.last_kernel_size, pad_mode=c.pad_mode, dtype=dtype, name="conv_out")(nn.elu(x))


class ResidualVectorQuantizer(nn.Module):
    """K levels of nearest-neighbour quantization on the residual; `codebooks` is [K, card, D] (float32)."""

    n_q: int
    card: int
    dim: int

    def setup(self):
        self.codebooks = _param(self, "codebooks", (self.n_q, self.card, self.dim), ("codebook", "card", "latent"))

    def encode(self, latents: jax.Array) -> jax.Array:
        """Latents [B, T, D] -> codes [B, K, T] int32 (argmax of -‖x - e‖², as the reference computes it)."""
        residual = latents.astype(jnp.float32)
        codes = []
        for book in self.codebooks:
            dist = -(jnp.sum(residual**2, -1, keepdims=True) - 2 * residual @ book.T + jnp.sum(book**2, -1))
            idx = jnp.argmax(dist, axis=-1).astype(jnp.int32)
            residual = residual - jnp.take(book, idx, axis=0)
            codes.append(idx)
        return jnp.stack(codes, axis=1)

    def decode(self, codes: jax.Array) -> jax.Array:
        """Codes [B, K, T] -> summed codebook vectors [B, T, D]."""
        return sum(jnp.take(self.codebooks[k], codes[:, k], axis=0) for k in range(codes.shape[1]))


class EncodecModel(nn.Module):
    """EnCodec: `encode` [B, C, N] -> [B, K, T] int32 codes, `decode` [B, K, T] -> [B, C, T * hop] audio."""

    config: EncodecConfig

    def setup(self):
        c = self.config
        self.encoder = SEANetEncoder(c)
        self.decoder = SEANetDecoder(c)
        self.quantizer = ResidualVectorQuantizer(c.n_q, c.card, c.dimension)

    def __call__(self, wav: jax.Array) -> jax.Array:
        """Round trip (also what `init` traces, creating every parameter)."""
        return self.decode(self.encode(wav))

    def latents(self, wav: jax.Array) -> jax.Array:
        """Audio [B, C, N] -> unquantized latents [B, ceil(N / hop), D] float32."""
        x = nn.with_logical_constraint(jnp.swapaxes(wav, 1, 2), _ACT)
        return self.encoder(x).astype(jnp.float32)

    def encode(self, wav: jax.Array) -> jax.Array:
        return self.quantizer.encode(self.latents(wav))

    def decode(self, codes: jax.Array) -> jax.Array:
        y = self.decoder(self.quantizer.decode(codes))
        return jnp.swapaxes(y, 1, 2).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------------------
# Pure entry points


@functools.partial(jax.jit, static_argnums=0)
def encode(config: EncodecConfig, params, wav: jax.Array) -> jax.Array:
    """Audio [B, C, N] -> codes [B, K, ceil(N / hop)] int32."""
    return EncodecModel(config).apply({"params": params}, wav, method=EncodecModel.encode)


@functools.partial(jax.jit, static_argnums=0)
def decode(config: EncodecConfig, params, codes: jax.Array) -> jax.Array:
    """Codes [B, K, T] -> audio [B, C, T * hop] float32."""
    return EncodecModel(config).apply({"params": params}, codes, method=EncodecModel.decode)


def round_trip(config: EncodecConfig, params, wav) -> np.ndarray:
    """Audio [B, C, N] -> its reconstruction through the codes [B, C, N] float32 (NumPy; what the codec keeps)."""
    wav = jnp.asarray(wav, jnp.float32)
    return np.asarray(decode(config, params, encode(config, params, wav)))[..., : wav.shape[-1]]


@functools.partial(jax.jit, static_argnums=0)
def latents(config: EncodecConfig, params, wav: jax.Array) -> jax.Array:
    """Audio [B, C, N] -> unquantized latents [B, ceil(N / hop), D] float32."""
    return EncodecModel(config).apply({"params": params}, wav, method=EncodecModel.latents)


def encode_long(config: EncodecConfig, params, wav, chunk_seconds: float) -> np.ndarray:
    """Encodes audio of any length in fixed chunks: [B, C, N] -> codes [B, K, ceil(N / hop)] int32 (NumPy).

    Chunks hold round(chunk_seconds · frame_rate) frames (a whole number of hops); the last one is zero-padded to
    the same size, so one compiled program serves every chunk and device memory stays that of one chunk. Each
    chunk is encoded on its own (edge padding, LSTM state restarting from zero), so the frames within a receptive
    field of a chunk boundary, and the last frames before the zero-padded end, can differ from encoding the whole
    file at once; a file whose length is a whole number of chunks ends exactly as whole-file encoding does.
    """
    hop = config.hop_length
    chunk = max(1, round(chunk_seconds * config.frame_rate)) * hop
    n = wav.shape[-1]
    pieces = []
    for start in range(0, n, chunk):
        piece = np.asarray(wav[..., start : start + chunk], np.float32)
        piece = np.pad(piece, ((0, 0), (0, 0), (0, chunk - piece.shape[-1])))
        pieces.append(np.asarray(encode(config, params, piece)))
    return np.concatenate(pieces, axis=-1)[..., : -(-n // hop)]


def decode_long(
    config: EncodecConfig, params, codes: jax.Array, *, chunk_frames: int, context_frames: int
) -> jax.Array:
    """Codes `[B, K, T]` -> audio `[B, C, T * hop]` float32 with the decoder's activations bounded by one window of
    W = chunk_frames + 2 * context_frames frames, whatever T (docs/design.md §6.13).

    T <= W: `decode` as is. Else the frames are cut into cores of `chunk_frames` (the last core ends at T, overlapping
    the one before); each core is decoded inside a window of W frames that gives it `context_frames` of real codes on
    each side where the sequence has them (windows are shifted inward at the two ends, so the first and last samples
    see the true sequence edges as whole-sequence decoding does), and only the core's samples are kept. One compiled
    program decodes every window. Samples near a core boundary differ slightly from whole-sequence decoding: the
    decoder's LSTM restarts from zero at each window start and reaches the core after `context_frames` of warm-up.
    """
    length, window = codes.shape[-1], chunk_frames + 2 * context_frames
    if chunk_frames < 1 or context_frames < 0:
        raise ValueError(f"chunk_frames={chunk_frames}, context_frames={context_frames}: expected >= 1 and >= 0")
    if length <= window:
        return decode(config, params, codes)
    cores = list(range(0, length - chunk_frames, chunk_frames)) + [length - chunk_frames]
    pieces = []
    for i, core in enumerate(cores):
        start = min(max(core - context_frames, 0), length - window)
        audio = _decode_core(config, params, codes, jnp.int32(start), jnp.int32(core - start), window, chunk_frames)
        if i == len(cores) - 1:  # the last core overlaps the one before it: keep its new frames
            audio = audio[..., (cores[i - 1] + chunk_frames - core) * config.hop_length :]
        pieces.append(audio)
    return jnp.concatenate(pieces, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _decode_core(
    config: EncodecConfig, params, codes: jax.Array, start: jax.Array, offset: jax.Array, window: int, core: int
) -> jax.Array:
    """Decodes frames [start, start + window) of `codes` and returns the samples of frames [start + offset, start +
    offset + core): `[B, C, core * hop]`."""
    frames = jax.lax.dynamic_slice_in_dim(codes, start, window, axis=-1)
    audio = EncodecModel(config).apply({"params": params}, frames, method=EncodecModel.decode)
    hop = config.hop_length
    return jax.lax.dynamic_slice_in_dim(audio, offset * hop, core * hop, axis=-1)


def abstract_params(config: EncodecConfig):
    """Parameter tree of ShapeDtypeStructs in `nn.LogicallyPartitioned` boxes (no computation)."""
    dummy = jax.ShapeDtypeStruct((1, config.channels, config.hop_length), jnp.float32)
    return jax.eval_shape(EncodecModel(config).init, jax.random.key(0), dummy)["params"]


def fit_codebooks(latent_frames: np.ndarray, card: int, n_q: int, *, seed: int, iters: int = 10) -> np.ndarray:
    """Residual k-means codebooks, EnCodec's codebook init: frames [N >= 2·card, D] -> [n_q, card, D] float32.

    Level k clusters the residual left by levels < k: `card` frames are drawn (with replacement when N < card)
    and jittered by 5 % of the residual's per-dimension spread so no two entries coincide, then refined by `iters`
    Lloyd steps (entries that attract no frame keep their position).
    """
    residual = np.asarray(latent_frames, np.float64)
    if residual.ndim != 2 or residual.shape[0] == 0:
        raise ValueError(f"latent frames must be [N, D] with N > 0, got shape {residual.shape}")
    _check_enough_frames(residual.shape[0], card)
    if not np.all(np.isfinite(residual)) or residual.std(0).max() < 1e-12:
        raise ValueError("calibration latents are constant or not finite (silent audio?): give audio with content")
    rng = np.random.default_rng(seed)
    books = []
    for _ in range(n_q):
        rows = rng.choice(len(residual), card, replace=len(residual) < card)
        book = residual[rows] + rng.normal(size=(card, residual.shape[1])) * 0.05 * residual.std(0)
        for _ in range(iters):
            nearest = _nearest(residual, book)
            counts = np.bincount(nearest, minlength=card)
            sums = np.zeros_like(book)
            np.add.at(sums, nearest, residual)
            used = counts > 0
            book[used] = sums[used] / counts[used, None]
        residual = residual - book[_nearest(residual, book)]
        books.append(book)
    return np.stack(books).astype(np.float32)


def _check_enough_frames(n_frames: int, card: int) -> None:
    if n_frames < 2 * card:
        raise ValueError(
            f"{n_frames} latent frames cannot fit {card} codebook entries: need at least {2 * card} "
            "(longer or more calibration audio)"
        )


def _nearest(x: np.ndarray, book: np.ndarray) -> np.ndarray:
    return ((x**2).sum(1, keepdims=True) - 2 * x @ book.T + (book**2).sum(1)).argmin(1)


def init_encodec(config: EncodecConfig, seed: int, calibration_wav) -> dict:
    """A locally created codec (no download): random weights plus codebooks fitted on `calibration_wav`.

    Conv kernels are N(0, 1/fan_in) (fan_in = k · C_in), conv biases zero, LSTM tensors U(±1/sqrt(D)) as in
    PyTorch, all drawn on the host from `seed`. Codebooks are residual k-means (`fit_codebooks`) over the
    encoder's latent frames of `calibration_wav` [B, C, N], so codes spread over the codebooks instead of
    collapsing onto one entry; B · N must cover at least 2 · card frames (2.6 s of audio for the 64-entry tiny
    codec at 50 Hz). Returns a param tree of float32 arrays.
    """
    wav = jnp.asarray(calibration_wav, jnp.float32)
    if wav.ndim != 3 or wav.shape[1] != config.channels:
        raise ValueError(f"calibration_wav must be [B, {config.channels}, N], got shape {tuple(wav.shape)}")
    _check_enough_frames(wav.shape[0] * -(-wav.shape[-1] // config.hop_length), config.card)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":  # conv [k, C_in, C_out]
            return rng.standard_normal(shape) / math.sqrt(shape[0] * shape[1])
        if name in ("input_kernel", "recurrent_kernel") or (name == "bias" and path[-2].key.startswith("layer_")):
            limit = 1 / math.sqrt(shape[0] if name != "bias" else shape[0] // 4)
            return rng.uniform(-limit, limit, shape)
        return np.zeros(shape)  # conv biases; codebooks are fitted below

    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(draw(p, x), jnp.float32), nn.unbox(abstract_params(config))
    )
    frames = np.asarray(latents(config, params, wav)).reshape(-1, config.dimension)
    books = fit_codebooks(frames, config.card, config.n_q, seed=seed)
    return {**params, "quantizer": {"codebooks": jnp.asarray(books)}}
