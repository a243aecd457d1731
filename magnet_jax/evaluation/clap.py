"""The CLAP score of the MAGNeT paper: LAION-CLAP's audio (`clap_audio`) and text (`clap_text`) towers in Flax, the
loader of the released checkpoint, and the score as audiocraft computes it.

The score (audiocraft/metrics/clap_consistency.py, `CLAPTextConsistencyMetric`, with the music checkpoint
`music_audioset_epoch_15_esc_90.14.pt` and `laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base")`) is the
mean over pairs of the cosine similarity (eps 1e-8) of a generated clip's audio embedding and its prompt's text
embedding. Both embeddings are L2-normalised projections to 512 dimensions. (The metric's own default architecture
is HTSAT-tiny; the music checkpoint is HTSAT-base, which audiocraft's config passes.) The audio path (`embed_audio`):

1. `convert_audio`: julius' resampler to 48 kHz (`magnet_jax.evaluation.audio.resample`), then the channel mean.
2. `CLAP_Module.get_audio_embedding_from_data(..., use_tensor=True)` (laion_clap/hook.py): no int16 quantisation;
   `get_audio_features` (laion_clap/training/data.py) with max_len 480000 (10 s), `rand_trunc`, `repeatpad`:
   a shorter clip is repeated `480000 // N` times and zero-padded to 480000; a longer one is cut to a random
   10 s window (`np.random.randint(0, N - 480000 + 1)` per clip, in batch order; here drawn from `crop_rng`).
   The non-fusion model never sees more than 10 s.
3. HTS-AT (`magnet_jax.evaluation.clap_audio`): log-mel front end, Swin transformer, `audio_projection`, L2 norm.

Param trees mirror the torch state dict of laion_clap's `CLAP` (`torch_key` maps a Flax path to its key):
`{"audio": {audio_branch/..., audio_projection_0, audio_projection_2}, "text": {text_branch/..., text_projection_0,
text_projection_2}}`. Released files are training checkpoints as laion_clap/training/main.py saves them,
`{"epoch", "name", "state_dict", optimizer...}`, keys with DistributedDataParallel's `module.` prefix (stripped as
laion_clap's `load_state_dict` does); a bare state dict, with or without the prefix, is read as well. The STFT and
mel matrices stored in it (frozen torchlibrosa parameters) are checked against the ones computed here.

  params = load_clap("music_audioset_epoch_15_esc_90.14.pt")      # or a directory holding it, or lukewys/laion_clap
  tokenizer = load_clap_tokenizer("path/to/roberta-base")         # vocab.json + merges.txt
  scores, mean = clap_score(embed_audio(params, audio, 32000), embed_text(params, tokenizer, prompts))
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.checkpoints.weights import check_state_dict, load_torch_pickle
from magnet_jax.data.audio import read_audio
from magnet_jax.evaluation.audio import resample
from magnet_jax.evaluation.clap_audio import (
    CLIP_SAMPLES,
    FMAX,
    FMIN,
    HOP,
    MEL_BINS,
    N_FFT,
    SAMPLE_RATE,
    ClapAudio,
    HtsatConfig,
    mel_filterbank,
    stft_kernels,
)
from magnet_jax.evaluation.clap_text import CONTEXT_LENGTH, ClapText, RobertaConfig, load_clap_tokenizer, tokenize
from magnet_jax.fileio import WeightsError, flatten_dict, resolve_file, unflatten_dict

__all__ = [
    "CLAP_MUSIC",
    "ClapConfig",
    "HtsatConfig",
    "RobertaConfig",
    "clap_score",
    "clap_score_files",
    "clap_waveforms",
    "embed_audio",
    "embed_text",
    "expected_shapes",
    "load_clap",
    "load_clap_tokenizer",
    "params_from_state_dict",
    "read_state_dict",
]

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity in clap_consistency.py
CHECKPOINT_NAME = "music_audioset_epoch_15_esc_90.14.pt"
CHECKPOINT_HUB_ID = "lukewys/laion_clap"


@dataclasses.dataclass(frozen=True)
class ClapConfig:
    audio: HtsatConfig = dataclasses.field(default_factory=HtsatConfig)
    text: RobertaConfig = dataclasses.field(default_factory=RobertaConfig)
    joint_dim: int = 512


CLAP_MUSIC = ClapConfig()  # HTSAT-base + roberta-base: the music checkpoint


# ---- embeddings and the score -----------------------------------------------------------------------------------


def clap_waveforms(audio, sample_rate: int, crop_rng: np.random.RandomState | None = None) -> jax.Array:
    """`[B, N]` mono audio at `sample_rate` -> `[B, 480000]` at 48 kHz, as audiocraft + laion_clap prepare it.

    Resampled with julius' filter; clips shorter than 10 s are repeated `480000 // N48` times and zero-padded,
    longer ones cut to a 10 s window starting at `crop_rng.randint(0, N48 - 480000 + 1)` per clip (the reference
    draws these from NumPy's global RNG; default `RandomState(0)`).
    """
    audio = jnp.asarray(audio, jnp.float32)
    if audio.ndim != 2 or audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"audio must be [B, N] with B, N > 0, got shape {tuple(audio.shape)}")
    audio = resample(audio, int(sample_rate), SAMPLE_RATE)
    length = audio.shape[1]
    if length > CLIP_SAMPLES:
        rng = crop_rng if crop_rng is not None else np.random.RandomState(0)
        starts = [int(rng.randint(0, length - CLIP_SAMPLES + 1)) for _ in range(audio.shape[0])]
        return jnp.stack([audio[i, s : s + CLIP_SAMPLES] for i, s in enumerate(starts)])
    if length < CLIP_SAMPLES:
        audio = jnp.tile(audio, (1, CLIP_SAMPLES // length))
        audio = jnp.pad(audio, ((0, 0), (0, CLIP_SAMPLES - audio.shape[1])))
    return audio


@functools.partial(jax.jit, static_argnames="config")
def _audio_embeddings(params, waveforms, config: ClapConfig):
    return ClapAudio(config.audio, config.joint_dim).apply({"params": params}, waveforms)


@functools.partial(jax.jit, static_argnames="config")
def _text_embeddings(params, ids, mask, config: ClapConfig):
    return ClapText(config.text, config.joint_dim).apply({"params": params}, ids, mask)


def embed_audio(
    params,
    audio,
    sample_rate: int,
    *,
    config: ClapConfig = CLAP_MUSIC,
    crop_rng: np.random.RandomState | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> np.ndarray:
    """`[B, N]` mono audio -> `[B, 512]` L2-normalised CLAP audio embeddings (float32 matmuls); `sharding` places
    the 48 kHz waveforms (rows over devices: B a multiple of their count)."""
    waveforms = clap_waveforms(audio, sample_rate, crop_rng)
    if sharding is not None:
        waveforms = jax.device_put(waveforms, sharding)
    with jax.default_matmul_precision("float32"):
        return np.asarray(_audio_embeddings(params["audio"], waveforms, config))


def embed_text(params, tokenizer, texts: Sequence[str], *, config: ClapConfig = CLAP_MUSIC) -> np.ndarray:
    """`B` prompts -> `[B, 512]` L2-normalised CLAP text embeddings (RoBERTa tokens padded/truncated to 77)."""
    ids, mask = tokenize(tokenizer, texts)
    with jax.default_matmul_precision("float32"):
        return np.asarray(_text_embeddings(params["text"], ids, mask, config))


def clap_score(audio_embeddings, text_embeddings) -> tuple[np.ndarray, float]:
    """Per-pair cosine similarities `[B]` and their mean (audiocraft's CLAPTextConsistencyMetric)."""
    a, t = np.asarray(audio_embeddings, np.float64), np.asarray(text_embeddings, np.float64)
    if a.ndim != 2 or a.shape != t.shape or a.shape[0] == 0:
        raise ValueError(f"embeddings must be two [B, D] arrays of one shape, got {a.shape} and {t.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1)
    scores = np.sum(a * t, axis=1) / np.maximum(norms, COSINE_EPS)
    return scores, float(scores.mean())


def clap_score_files(
    params, tokenizer, paths: Sequence[str | os.PathLike], texts: Sequence[str], *, config: ClapConfig = CLAP_MUSIC
) -> tuple[np.ndarray, float]:
    """CLAP score of audio files (any rate, downmixed) against their prompts, one file at a time."""
    if len(paths) != len(texts):
        raise ValueError(f"{len(paths)} audio files but {len(texts)} prompts")
    audio = []
    for path in paths:
        wav, rate = read_audio(path)
        audio.append(embed_audio(params, wav.mean(axis=0)[None], rate, config=config))
    return clap_score(np.concatenate(audio), embed_text(params, tokenizer, texts, config=config))


# ---- weights ----------------------------------------------------------------------------------------------------

FRONT_END_KEYS = (
    "audio_branch.spectrogram_extractor.stft.conv_real.weight",
    "audio_branch.spectrogram_extractor.stft.conv_imag.weight",
    "audio_branch.logmel_extractor.melW",
)
# State the checkpoint holds that the embeddings do not use: classification heads, the contrastive MLPs and
# temperatures, and buffers recomputed here (Swin's relative indices and shift masks, RoBERTa's position ids).
UNUSED_PREFIXES = (
    "audio_branch.tscam_conv.",
    "audio_branch.head.",
    "audio_transform.",
    "text_transform.",
    "logit_scale_a",
    "logit_scale_t",
)
UNUSED_SUFFIXES = (
    ".relative_position_index",
    ".attn_mask",
    ".num_batches_tracked",
    "embeddings.position_ids",
    "embeddings.token_type_ids",
)


def torch_key(path: Sequence[str]) -> str:
    """Flax path inside a tower (`audio_branch/layers_0/blocks_1/attn/qkv/kernel`) -> laion_clap state-dict key
    (`audio_branch.layers.0.blocks.1.attn.qkv.weight`)."""
    *modules, leaf = path
    names = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
    return ".".join(names + [{"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)])


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return array.T if array.ndim == 2 else np.transpose(array, (2, 3, 1, 0))  # Linear / Conv2d OIHW -> HWIO
    return array


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel":
        return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


@functools.cache
def abstract_params(config: ClapConfig = CLAP_MUSIC) -> dict:
    """`{"audio": ..., "text": ...}` param shapes (`jax.ShapeDtypeStruct`) of both towers, from `jax.eval_shape`."""
    key = jax.random.PRNGKey(0)
    audio = jax.eval_shape(
        ClapAudio(config.audio, config.joint_dim).init, key, jax.ShapeDtypeStruct((1, CLIP_SAMPLES), jnp.float32)
    )["params"]
    tokens = jax.ShapeDtypeStruct((1, CONTEXT_LENGTH), jnp.int32)
    text = jax.eval_shape(ClapText(config.text, config.joint_dim).init, key, tokens, tokens)["params"]
    return {"audio": audio, "text": text}


def expected_shapes(config: ClapConfig = CLAP_MUSIC) -> dict[str, tuple[int, ...]]:
    """laion_clap `CLAP` state-dict key -> shape, for every tensor the embeddings read (front-end matrices too)."""
    shapes = {}
    for tower in abstract_params(config).values():
        for name, leaf in flatten_dict(tower).items():
            path = tuple(name.split("/"))
            shapes[torch_key(path)] = _torch_shape(path[-1], leaf.shape)
    real, imag = stft_kernels()
    shapes.update(zip(FRONT_END_KEYS, (real.shape, imag.shape, mel_filterbank().shape)))
    return shapes


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The model state dict of a laion_clap checkpoint file (training wrapper and `module.` prefix removed)."""
    what = f"CLAP checkpoint {path}"
    obj = load_torch_pickle(path, what=what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightsError(
            f"{what}: not a laion_clap checkpoint (expected a state dict of tensors, or a dict "
            "with one under 'state_dict')"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ClapConfig = CLAP_MUSIC, *, source: str) -> dict:
    """laion_clap `CLAP` state dict -> `{"audio", "text"}` params; strict about keys, shapes and the front end."""
    ignore = [k for k in state if k.startswith(UNUSED_PREFIXES) or k.endswith(UNUSED_SUFFIXES)]
    check_state_dict(state, expected_shapes(config), source=source, ignore=ignore)
    real, imag = stft_kernels()
    for key, ours in zip(FRONT_END_KEYS, (real, imag, mel_filterbank())):
        error = float(np.max(np.abs(np.asarray(state[key], np.float64) - ours)))
        if error > 1e-5 * float(np.max(np.abs(ours))):
            raise WeightsError(
                f"{source}: {key} differs from HTSAT's front end (n_fft {N_FFT}, hop {HOP}, "
                f"{MEL_BINS} Slaney mels {FMIN:g}-{FMAX:g} Hz at {SAMPLE_RATE} Hz) by {error:.3g}"
            )
    params = {}
    for tower, shapes in abstract_params(config).items():
        flat = {
            name: jnp.asarray(
                _to_flax(name.rsplit("/", 1)[-1], np.asarray(state[torch_key(name.split("/"))], np.float32))
            )
            for name in flatten_dict(shapes)
        }
        params[tower] = unflatten_dict(flat)
    return params


def load_clap(source: str | os.PathLike, config: ClapConfig = CLAP_MUSIC) -> dict:
    """CLAP params from the released checkpoint: its file, a directory holding `music_audioset_epoch_15_esc_90.14.pt`,
    or the hub id `lukewys/laion_clap` (where the hub is reachable)."""
    path = resolve_file(source, CHECKPOINT_NAME, what="CLAP checkpoint")
    return params_from_state_dict(read_state_dict(path), config, source=str(path))
