r"""Python generation API in the spirit of audiocraft's `MAGNeT` (docs/design.md §6.2, §6.10, §7).

  model = MAGNeT.from_pretrained(source)   # hub id, converted checkpoint, audiocraft files or a training workdir
  model.set_generation_params(decoding_steps=[20, 10, 10, 10])
  out = model.generate(["80s rock song with a guitar solo", "calm piano"], seed=0)
  out.audio, out.codes                     # [B, 1, N] float32 at model.sample_rate, [B, K, T] int32

Row i of a call uses the key `fold_in(key(seed), i)` and is conditioned on its own description only (§6.11), so a
sample never depends on its batch mates. Rows are sharded over the mesh's batch axes, the LM follows the
logical-axis rules, T5 and EnCodec are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from magnet_jax import sharding
from magnet_jax.checkpoints import pretrained
from magnet_jax.checkpoints.encodec_weights import load_encodec
from magnet_jax.checkpoints.sources import load_lm
from magnet_jax.checkpoints.t5_weights import load_t5
from magnet_jax.data.audio import to_codec_audio
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.fileio import WeightsError, local_source
from magnet_jax.generation import decoding, hybrid, windows
from magnet_jax.models import conditioner, encodec, t5
from magnet_jax.models.lm import LanguageModel, LMConfig, cast_params, init_params

DECODE_PARAMS = tuple(f.name for f in dataclasses.fields(decoding.DecodeParams))
PREFIX_PARAMS = tuple(f.name for f in dataclasses.fields(decoding.PrefixParams))
GENERATION_PARAMS = DECODE_PARAMS + PREFIX_PARAMS + ("duration", "extend_stride")
DECODE_CHUNK_SECONDS = 10.0  # EnCodec decodes longer outputs in windows of this (or the LM window, if longer) ...
DECODE_CONTEXT_SECONDS = 1.0  # ... plus this much context on each side (`encodec.decode_long`)
# What a loaded model is set up with (`MAGNeT.from_pretrained(**settings)`; the top-level fields of
# configs/generate.py start from these).
DEFAULT_SETTINGS = {
    "t5": "",  # text encoder (hub id or dir) instead of the checkpoint's; "" = the checkpoint's
    "codec": "",  # EnCodec (hub id, dir or file) instead of the checkpoint's; "" = the checkpoint's
    # LM compute dtype ("bfloat16" on accelerators); the LM params are cast to it once at load. Attention softmax,
    # logits and sampling stay float32 (docs/design.md §11.2)
    "dtype": "float32",
    # attention kernel (model.attention): splash on TPU, cuDNN on GPU for 16-bit compute, else XLA; or force one
    "attention": "auto",
    # data parallel over every device of every host; `tensor` > 1 shards the LM by the rules (large models)
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1},
    "sharding_rules": list(sharding.DEFAULT_RULES),
    "text_length": 256,  # descriptions are padded to this many tokens (one compile), longer ones truncated
    # Causal MusicGen models (hub id e.g. facebook/musicgen-small, audiocraft or transformers files, converted dir):
    "rescorer": "",  # mixed into the span confidences (generate.rescore_weight); "" = no rescoring
    "ar_model": "",  # generates the first generate.prefix_seconds (composition-mode hybrid); may equal rescorer
}
SETTINGS = tuple(DEFAULT_SETTINGS)
SOURCE_SETTINGS = ("t5", "codec", "rescorer", "ar_model")  # model sources: local paths are made absolute


def resolve_sources(settings) -> None:
    """Makes the local paths among `settings`' model sources absolute in place (hub ids are kept)."""
    for key in SOURCE_SETTINGS:
        settings[key] = local_source(settings[key])


def make_settings(**overrides) -> ml_collections.ConfigDict:
    """`DEFAULT_SETTINGS` with `overrides`, as `MAGNeT(config, params, settings)` takes them."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    return ml_collections.ConfigDict({**DEFAULT_SETTINGS, **overrides})


class Generation(NamedTuple):
    """What `generate` / `generate_continuation` return (host NumPy)."""

    audio: np.ndarray  # [B, 1, N] float32 at `MAGNeT.sample_rate`, N = T * hop
    codes: np.ndarray  # [B, K, T] int32, prompt codes included


# ------------------------------------------------------------------------------------------------------------
# Rows and keys


def row_keys(seeds_and_indices: Sequence[tuple[int, int]]) -> np.ndarray:
    """Raw `[B, 2]` uint32 PRNG keys `fold_in(key(seed), index)`, one per row (seeds in [0, 2**32))."""
    bad = [seed for seed, _ in seeds_and_indices if not 0 <= seed < 2**32]
    if bad:
        raise ValueError(f"seed {bad[0]}: expected an integer in [0, 2**32)")
    return np.stack(
        [
            np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), index)))
            for seed, index in seeds_and_indices
        ]
    ).astype(np.uint32)


def check_descriptions(descriptions: str | Sequence[str | None] | None, n: int | None = None) -> list[str | None]:
    """The descriptions of a call as a list: a single string is one description; each must be a string or None
    (ValueError otherwise, and when `n` is given and the count differs)."""
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    elif descriptions is None or not isinstance(descriptions, Sequence):
        raise ValueError(
            f"descriptions: expected a string or a list of strings / None, got {type(descriptions).__name__}"
        )
    descriptions = list(descriptions)
    bad = [(i, d) for i, d in enumerate(descriptions) if d is not None and not isinstance(d, str)]
    if bad:
        i, d = bad[0]
        raise ValueError(f"descriptions[{i}]={d!r}: expected a string or None, got {type(d).__name__}")
    if n is not None and len(descriptions) != n:
        raise ValueError(f"{len(descriptions)} descriptions for {n} prompts")
    return descriptions


def _global(x: np.ndarray, sharding_: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def local_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """The rows of a batch-sharded global array held by this process: `{row index: row}`."""
    rows = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            rows.setdefault(start + i, data[i])
    return rows


# ------------------------------------------------------------------------------------------------------------


class MAGNeT:
    """A MAGNeT text-to-music / text-to-sound model ready to generate: LM + T5 + EnCodec on a device mesh."""

    def __init__(self, config: Mapping[str, Any], lm_params, settings: ml_collections.ConfigDict):
        """Builds from a config.json dict, its LM params, and `settings` (a configs/generate.py config: t5, codec,
        dtype, attention, mesh, sharding_rules, text_length, rescorer, ar_model; its `source` and `generate`
        sections are not read here)."""
        self.config = dict(config)
        source = config.get("provenance", {}).get("source", "model")
        lm_config = _lm_config(config, settings)
        if lm_config.causal:
            raise WeightsError(f"{source}: a causal (MusicGen) model; MAGNeT generation needs a non-causal one")
        self.objective = pretrained.model_objective(config, source)
        if self.objective.generates_prefix and (settings.rescorer or settings.ar_model):
            raise WeightsError(
                f"{source}: a {self.objective.title} model (objective {self.objective.name!r}) "
                "generates its own prefix; rescorer and ar_model are not supported with it"
            )
        self.model = LanguageModel(lm_config)
        self.mesh = sharding.make_mesh(settings.mesh)
        self.rules = sharding.logical_rules(settings)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
        self.batch_multiple = math.prod(self.mesh.shape[a] for a in self.batch_sharding.spec[0])
        self.text_length = int(settings.text_length)

        abstract = jax.eval_shape(lambda k: init_params(self.model, k), jax.random.key(0))
        shardings = sharding.logical_shardings(abstract, self.mesh, self.rules)
        self.lm_params = jax.jit(cast_params, static_argnums=1, out_shardings=shardings)(
            jax.device_put(lm_params, shardings), settings.dtype
        )
        self.t5_source = settings.t5 or config["conditioner"]["t5"]
        self.tokenizer = TextTokenizer(self.t5_source, max_length=self.text_length)
        self.t5_config, t5_params = load_t5(self.t5_source)
        if self.t5_config.d_model != lm_config.cond_dim:
            raise WeightsError(
                f"text encoder {self.t5_source}: d_model {self.t5_config.d_model} but the LM expects "
                f"cond_dim {lm_config.cond_dim}"
            )
        self.t5_params = jax.device_put(t5_params, t5.param_shardings(self.t5_config, self.mesh, self.rules))
        self.codec_source = settings.codec or config["codec"]["source"]
        self.codec_config, codec_params = load_encodec(self.codec_source)
        if (self.codec_config.n_q, self.codec_config.card) != (lm_config.n_q, lm_config.card):
            raise WeightsError(
                f"codec {self.codec_source}: {self.codec_config.n_q} codebooks of "
                f"{self.codec_config.card} but the LM models {lm_config.n_q} of {lm_config.card}"
            )
        self.codec_params = jax.device_put(codec_params, sharding.replicated(self.mesh))
        self.segment_seconds = float(config["segment_seconds"])
        companions = {}  # source -> (LanguageModel, params): one model may serve as both, loaded once
        for what in ("rescorer", "ar_model"):
            if settings[what] and settings[what] not in companions:
                companions[settings[what]] = self._load_companion(settings[what], settings, what)
        self.rescorer = companions.get(settings.rescorer)  # (causal LanguageModel, params) or None
        self.ar_model = companions.get(settings.ar_model)
        stored = {k: v for k, v in config.get("generate", {}).items() if k in DECODE_PARAMS}
        self._params = {
            **dataclasses.asdict(decoding.DecodeParams()),
            **dataclasses.asdict(decoding.PrefixParams()),
            **stored,
            "duration": self.segment_seconds,
            "extend_stride": self.segment_seconds / 2,
        }
        self._condition = jax.jit(
            functools.partial(conditioner.row_conditioning, self.t5_config, self.tokenizer.pad_id)
        )

    def _load_companion(self, source: str, settings: ml_collections.ConfigDict, what: str) -> tuple[LanguageModel, Any]:
        """A causal MusicGen model (any `load_lm` source) checked against the MAGNeT LM, its params on the same mesh
        under the same logical-axis rules."""
        config, params = load_lm(source)
        model = LanguageModel(_lm_config(config, settings))
        try:
            decoding.check_companion(self.model.config, model.config, f"{what} {source}")
        except ValueError as e:
            raise WeightsError(str(e)) from None
        abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
        shardings = sharding.logical_shardings(abstract, self.mesh, self.rules)
        return model, jax.jit(cast_params, static_argnums=1, out_shardings=shardings)(
            jax.device_put(params, shardings), settings.dtype
        )

    @classmethod
    def from_pretrained(cls, source: str, **settings) -> MAGNeT:
        """Loads a model.

        Args:
          source: hub id, converted checkpoint dir, audiocraft-format dir/file, or training workdir.
          **settings: top-level fields of configs/generate.py: `t5` / `codec` (sources instead of the ones the
            checkpoint names), `dtype` (LM compute dtype, "bfloat16" on accelerators), `mesh` (a mesh section;
            default every device data parallel), `sharding_rules`, `text_length` (descriptions are padded and
            truncated to this many tokens), `rescorer` (a causal MusicGen source whose teacher-forced probabilities
            are mixed into the span confidences, `rescore_weight`), `ar_model` (a causal MusicGen source that
            generates the first `prefix_seconds` autoregressively). MusicGen sources: hub id (e.g.
            facebook/musicgen-small; audiocraft or transformers files), directory, file, converted checkpoint or
            training workdir; same codebooks, card and text-encoder width as the MAGNeT model. A Hybrid-MAGNeT
            model (config.json "objective": "hybrid") takes neither: it generates its own prefix.
        """
        settings = make_settings(**settings)
        resolve_sources(settings)
        return cls(*load_lm(local_source(source)), settings)

    # --- properties -----------------------------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return int(self.codec_config.sample_rate)

    @property
    def frame_rate(self) -> float:
        return float(self.codec_config.frame_rate)

    @property
    def duration(self) -> float:
        """Seconds of audio per sample (prompt included)."""
        return float(self._params["duration"])

    @property
    def generation_params(self) -> dict:
        return dict(self._params)

    @property
    def decode_params(self) -> decoding.DecodeParams:
        return decoding.DecodeParams(**{k: self._params[k] for k in DECODE_PARAMS})

    @property
    def prefix_params(self) -> decoding.PrefixParams:
        return decoding.PrefixParams(**{k: self._params[k] for k in PREFIX_PARAMS})

    @property
    def prefix_frames(self) -> int:
        """Frames generated autoregressively (by the `ar_model`, or by a hybrid model itself) before MAGNeT decodes
        the rest: `int(prefix_seconds * frame_rate)`."""
        return int(self.prefix_params.prefix_seconds * self.frame_rate)

    @property
    def num_frames(self) -> int:
        """Code frames per sample: `int(duration * frame_rate)`, trimmed to whole spans in 'nonoverlap' mode."""
        return self.decode_params.output_length(int(self.duration * self.frame_rate))

    @property
    def window_frames(self) -> int:
        """Frames of one window, the model's training segment (`num_frames` at duration = segment)."""
        return self.decode_params.output_length(int(self.segment_seconds * self.frame_rate))

    @property
    def window_plan(self) -> windows.WindowPlan:
        """How `num_frames` are generated: one window when they fit in `window_frames`, else windows that continue
        the last `window - extend_stride` seconds of the one before (`magnet_jax.generation.windows`)."""
        return windows.WindowPlan(
            total=self.num_frames,
            window=self.window_frames,
            stride=int(float(self._params["extend_stride"]) * self.frame_rate),
        )

    def set_generation_params(self, **params) -> None:
        """Changes the given generation parameters (the others keep their values).

        Names: decoding_steps, temperature, anneal_temp, top_p, top_k, use_sampling, max_cfg, min_cfg,
        span_arrangement, span_scoring, span_len, rescore_weight, rescore_mode (see
        `magnet_jax.generation.decoding.DecodeParams`; rescore_weight and rescore_mode are used only with a
        `rescorer`), prefix_seconds, ar_cfg_coef, ar_temperature, ar_top_k, ar_top_p, ar_use_sampling
        (`magnet_jax.generation.decoding.PrefixParams`; prefix_seconds > 0 needs an `ar_model` or a hybrid model,
        which may generate all frames autoregressively), duration (seconds; longer than the model's training
        segment = windowed generation, not with a hybrid model) and extend_stride (seconds of new audio per window
        after the first; each window continues the last `segment - extend_stride` seconds of the one before;
        default half the segment).
        """
        unknown = sorted(set(params) - set(GENERATION_PARAMS))
        if unknown:
            raise ValueError(
                f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(GENERATION_PARAMS)}"
            )
        updated = {**self._params, **params}
        if "decoding_steps" in params:
            updated["decoding_steps"] = [int(s) for s in params["decoding_steps"]]
        decode_params = decoding.DecodeParams(**{k: updated[k] for k in DECODE_PARAMS})  # validates
        prefix_params = decoding.PrefixParams(**{k: updated[k] for k in PREFIX_PARAMS})
        if len(decode_params.decoding_steps) != self.model.config.n_q:
            raise ValueError(
                f"decoding_steps={list(decode_params.decoding_steps)}: expected "
                f"{self.model.config.n_q} entries (one per codebook)"
            )
        if not float(updated["duration"]) > 0:
            raise ValueError(f"duration={updated['duration']}: expected a positive number of seconds")
        window = decode_params.output_length(int(self.segment_seconds * self.frame_rate))
        stride = int(float(updated["extend_stride"]) * self.frame_rate)
        if not 0 < stride < window:
            raise ValueError(
                f"extend_stride={updated['extend_stride']}: expected between 1 / frame rate and the "
                f"{window / self.frame_rate:g} s window minus one frame ({stride} of {window} frames)"
            )
        num_frames = decode_params.output_length(int(float(updated["duration"]) * self.frame_rate))
        if num_frames < 1:
            raise ValueError(f"duration={updated['duration']}: shorter than one span")
        if num_frames > window and self.objective.generates_prefix:
            raise ValueError(
                f"duration={updated['duration']}: longer than the model's training segment "
                f"{self.segment_seconds:g} s; windowed generation continues audio prompts, which a "
                f"{self.objective.title} model does not support"
            )
        num_frames = min(num_frames, window)  # the AR prefix lies in the first window
        if prefix_params.prefix_seconds > 0:
            if self.ar_model is None and not self.objective.generates_prefix:
                raise ValueError(
                    f"prefix_seconds={prefix_params.prefix_seconds}: needs an AR model "
                    "(from_pretrained(..., ar_model=<MusicGen source>) / config.ar_model)"
                )
            most = num_frames if self.objective.generates_prefix else num_frames - 1  # a hybrid may do all frames
            if not 0 < int(prefix_params.prefix_seconds * self.frame_rate) <= most:
                raise ValueError(
                    f"prefix_seconds={prefix_params.prefix_seconds}: expected between 1 and {most} of "
                    f"the {num_frames} generated frames"
                )
        updated["duration"], updated["extend_stride"] = float(updated["duration"]), float(updated["extend_stride"])
        self._params = updated

    # --- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        descriptions: str | Sequence[str | None],
        *,
        seed: int = 0,
        prefix_seconds: float | None = None,
        duration: float | None = None,
        extend_stride: float | None = None,
    ) -> Generation:
        """Text-to-music: one sample per description (None or "" = unconditional; a single string is one
        description).

        `prefix_seconds`, `duration`, `extend_stride` (default: the generation parameters) apply to this call only.
        `prefix_seconds` > 0: the composition-mode hybrid; the `ar_model` (or a Hybrid-MAGNeT model itself)
        generates that many seconds, then MAGNeT decodes the rest with them as a frozen prompt. `duration` longer
        than the model's training segment: windowed generation, each window after the first continuing the last
        `segment - extend_stride` seconds of the one before (`window_plan`).
        """
        descriptions = check_descriptions(descriptions)
        overrides = {
            k: v
            for k, v in (("prefix_seconds", prefix_seconds), ("duration", duration), ("extend_stride", extend_stride))
            if v is not None
        }
        if not overrides:
            return self._generate(descriptions, seed, prompt=None)
        saved = self._params
        self.set_generation_params(**overrides)
        try:
            return self._generate(descriptions, seed, prompt=None)
        finally:
            self._params = saved

    def generate_continuation(
        self,
        prompt,
        prompt_sample_rate: int,
        descriptions: str | Sequence[str | None] | None = None,
        *,
        seed: int = 0,
    ) -> Generation:
        """Continues audio prompts: `prompt` `[B, C, N]` or `[C, N]` at `prompt_sample_rate`.

        The prompt is downmixed, resampled to the codec rate and encoded (Tp = ceil(N' / hop) frames, fewer than
        `window_frames`); its codes stay in the output, which still has `num_frames` frames in all (windowed when
        `duration` is longer than the training segment). With
        `prefix_seconds` longer than the prompt, the `ar_model` first continues it up to the prefix length.
        Not available with a Hybrid-MAGNeT model.
        """
        self._check_no_prompt_for_hybrid()
        wav = np.asarray(prompt, np.float32)
        wav = wav[None] if wav.ndim == 2 else wav
        if wav.ndim != 3 or wav.shape[-1] == 0:
            raise ValueError(f"prompt: expected audio [B, C, N] or [C, N], got shape {np.shape(prompt)}")
        if not np.isfinite(wav).all():
            raise ValueError(f"prompt: {np.size(wav) - np.isfinite(wav).sum()} samples are NaN or infinite")
        n = wav.shape[0]
        descriptions = [None] * n if descriptions is None else check_descriptions(descriptions, n)
        return self._generate(descriptions, seed, prompt=self.encode_audio(wav, prompt_sample_rate))

    def _generate(self, descriptions: list, seed: int, prompt: np.ndarray | None) -> Generation:
        n = len(descriptions)
        if n == 0:
            raise ValueError("no descriptions given")
        pad = -n % self.batch_multiple  # rows that fill the last device; dropped below
        keys = row_keys([(seed, i) for i in range(n)] + [(seed, 0)] * pad)
        if prompt is not None:
            prompt = np.concatenate([prompt, np.repeat(prompt[:1], pad, axis=0)])
        codes = self.generate_codes(descriptions + descriptions[:1] * pad, keys, prompt)
        audio = self.decode_audio(codes)
        gather = functools.partial(multihost_utils.process_allgather, tiled=True)
        return Generation(audio=np.asarray(gather(audio))[:n], codes=np.asarray(gather(codes))[:n])

    def encode_audio(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Audio `[B, C, N]` at `sample_rate` -> codes `[B, K, ceil(N' / hop)]` int32 (N' samples at the codec rate)."""
        audio = to_codec_audio(wav, sample_rate, self.sample_rate)
        codes = encodec.encode(self.codec_config, self.codec_params, _global(audio, sharding.replicated(self.mesh)))
        return np.asarray(codes.addressable_data(0))

    def generate_codes(
        self, descriptions: Sequence[str | None], keys: np.ndarray, prompt: np.ndarray | None = None
    ) -> jax.Array:
        """The sharded core: B rows -> codes `[B, K, num_frames]` (a global array sharded over the batch axes).

        Args:
          descriptions: B descriptions (None = unconditional); B a multiple of `batch_multiple`.
          keys: `[B, 2]` uint32 row keys (`row_keys`).
          prompt: optional `[B, K, Tp]` prompt codes, the same Tp for every row.
        With `prefix_seconds` > 0 (and a prompt shorter than the prefix) the `ar_model` generates the first
        `prefix_frames` frames (continuing the prompt); MAGNeT then decodes the rest with them frozen. With a
        `rescorer` and `rescore_weight` < 1, span confidences mix in its probabilities. A Hybrid-MAGNeT model
        generates (`hybrid.generate_hybrid_codes`, row keys) its own `prefix_frames` with the `ar_*` sampling, then
        decodes the rest; no prompt. When `num_frames` exceed `window_frames`, the first window is generated so, and
        the next ones continue it (`windows.extend`: MAGNeT continuation of the previous window's last frames with
        the same text conditioning, row keys derived from `keys`; one compiled window program).
        Every process passes the same arguments.
        """
        if prompt is not None:
            self._check_no_prompt_for_hybrid()
        n = len(descriptions)
        if n % self.batch_multiple:
            raise ValueError(f"{n} rows: expected a multiple of {self.batch_multiple} (the batch's device count)")
        tokens = self.tokenizer(descriptions)
        extra = ((0, 0), (0, self.text_length - tokens["ids"].shape[1]))
        ids = np.pad(tokens["ids"], extra, constant_values=self.tokenizer.pad_id)
        mask = np.pad(tokens["mask"], extra)
        # The computation follows the shardings of its inputs (rows over the batch axes, params as placed). No mesh
        # context: under one, Linen's shape check of DenseGeneral kernels constrains their flattened init at the
        # wrong rank; the logical-axis rules are what the decoder reads at trace time.
        cond = self._condition(self.t5_params, _global(ids, self.batch_sharding), _global(mask, self.batch_sharding))
        keys = _global(keys, self.batch_sharding)
        plan = self.window_plan
        first = self._first_window(cond, keys, prompt)
        if plan.num_windows == 1:
            return first

        generate_window = windows.continuation(
            self.model, self.lm_params, cond, self.decode_params, window=plan.window, rescorer=self.rescorer
        )
        with nn.logical_axis_rules(self.rules):
            return windows.extend(first, generate_window, keys, plan)

    def _first_window(self, cond: conditioner.TextConditioning, keys: jax.Array, prompt: np.ndarray | None):
        """Codes `[B, K, min(num_frames, window_frames)]` of the first (or only) window."""
        length = int(min(self.duration, self.segment_seconds) * self.frame_rate)
        with nn.logical_axis_rules(self.rules):
            if self.objective.generates_prefix:
                return hybrid.generate_hybrid_codes(
                    self.model,
                    self.lm_params,
                    cond,
                    keys,
                    self.decode_params,
                    length=length,
                    prefix_frames=self.prefix_frames,
                    ar_sample=self.prefix_params.sample_fn(self.model.config.card),
                    ar_cfg=self.prefix_params.ar_cfg_coef,
                )
            if prompt is not None:
                prompt = _global(np.asarray(prompt, np.int32), self.batch_sharding)
            if self.prefix_frames and (prompt is None or prompt.shape[-1] < self.prefix_frames):
                if self.ar_model is None:
                    raise ValueError("prefix_seconds > 0 needs an AR model (ar_model=<MusicGen source>)")
                prompt = decoding.generate_prefix(
                    *self.ar_model, cond, keys, self.prefix_params, length=self.prefix_frames, prompt=prompt
                )
            return decoding.generate_codes(
                self.model,
                self.lm_params,
                cond,
                keys,
                self.decode_params,
                length=length,
                prompt=prompt,
                rescorer=self.rescorer,
            )

    def _check_no_prompt_for_hybrid(self) -> None:
        if self.objective.generates_prefix:
            raise ValueError(
                f"audio prompts (continuation) are not supported with a {self.objective.title} model "
                f"(objective {self.objective.name!r})"
            )

    def decode_audio(self, codes: jax.Array) -> jax.Array:
        """Codes `[B, K, T]` -> audio `[B, 1, T * hop]` float32 (sharded as `codes`). Up to max(10 s, the LM window)
        + 2 s the codec decodes them at once; longer codes are decoded in windows of that size, 1 s of context on
        each side of the kept part (`encodec.decode_long`), so memory does not grow with T beyond the output."""
        rate = self.codec_config.frame_rate
        return encodec.decode_long(
            self.codec_config,
            self.codec_params,
            codes,
            chunk_frames=max(self.window_frames, round(DECODE_CHUNK_SECONDS * rate)),
            context_frames=round(DECODE_CONTEXT_SECONDS * rate),
        )


def _lm_config(config: Mapping[str, Any], settings: ml_collections.ConfigDict) -> LMConfig:
    """The LM of a config.json dict computing in `settings.dtype` with its params held in it too (`cast_params`),
    attention by `settings.attention`."""
    dtype = settings.dtype
    return LMConfig.from_config(
        {**config["model"], "dtype": dtype, "param_dtype": dtype, "attention": settings.get("attention", "auto")}
    )
