"""MAGNeT iterative decoding (docs/design.md §6): codebook stages one after another, MaskGIT-style steps within each.

One jitted program runs the whole generation: the conditioning's cross-attention keys/values are computed once,
then a `lax.fori_loop` over the stages runs a `lax.fori_loop` over each stage's steps (stage and step traced). A step
re-masks the least confident units, runs the LM once on the classifier-free-guidance batch, samples into the masked
positions and scores them (optionally mixing in a rescorer's probabilities, paper Eq. 5). The schedule is computed
on the host (`stage_schedule`) and enters the program as arrays, so step counts, temperature and CFG do not
recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.generation import musicgen
from magnet_jax.generation.sampling import (
    FROZEN_SCORE,
    chunk_scores,
    least_probable_span_mask,
    sample_mixture,
    sample_tokens,
    top_units_mask,
)
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig

SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
SPAN_SCORINGS = ("max", "prod")
RESCORE_MODES = ("rank", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """Decoding settings (frozen, hashable). Defaults are the reference's music defaults (docs/design.md §6.2).

    decoding_steps: steps per codebook stage (one entry per codebook).
    temperature / anneal_temp: initial softmax temperature; annealed as `temperature * (n - 1 - i) / n`, clamped
      at 0.01 (docs/design.md §6.5).
    top_p / top_k / use_sampling: nucleus when top_p > 0, else top-k when top_k > 0, else multinomial; greedy
      argmax when use_sampling is False (confidences still use the tempered softmax).
    max_cfg / min_cfg: CFG coefficient annealed from max_cfg (all masked) to min_cfg (docs/design.md §6.6).
    span_arrangement: 'nonoverlap' (chunks of span_len tokens, length trimmed to a multiple of span_len) or
      'stride1' (overlapping spans, docs/design.md §6.9).
    span_scoring: 'max' (1 - max prob in the chunk) or 'prod' (sum of -log prob); nonoverlap only.
    span_len: span length of the masking scheme (`config.masking.span_len`).
    rescore_weight: w of paper Eq. 5 (w on MAGNeT's term, as Eq. 5 and issue 7; the paper's Fig. 4 pseudo-code puts
      it on the rescorer's): the mixture `w * p_magnet + (1 - w) * p_rescorer`. Used only when a rescorer is given;
      1 = plain decoding. The paper states no value; 0.5 (the default) weighs the two models equally, preferring
      neither without evidence.
    rescore_mode: how the mixture is used (docs/design.md §7.1). 'rank' (Fig. 4's pseudo-code): tokens are sampled
      from MAGNeT, the mixture of each sampled token's probabilities (the rescorer teacher-forced on the candidate)
      only ranks the spans for re-masking. 'sample' (Eq. 5's text): the rescorer's distributions on the re-masked
      input are mixed with MAGNeT's, tokens are drawn from the mixture and ranked by their mixed probability.
    """

    decoding_steps: tuple[int, ...] = (20, 10, 10, 10)
    temperature: float = 3.0
    anneal_temp: bool = True
    top_p: float = 0.9
    top_k: int = 0
    use_sampling: bool = True
    max_cfg: float = 10.0
    min_cfg: float = 1.0
    span_arrangement: str = "nonoverlap"
    span_scoring: str = "max"
    span_len: int = 3
    rescore_weight: float = 0.5
    rescore_mode: str = "rank"

    def __post_init__(self):
        steps = tuple(self.decoding_steps)
        if not steps or any(isinstance(n, bool) or int(n) != n or n < 1 for n in steps):
            raise ValueError(f"decoding_steps={list(steps)}: expected positive integers, one per codebook")
        object.__setattr__(self, "decoding_steps", tuple(int(n) for n in steps))
        if self.span_arrangement not in SPAN_ARRANGEMENTS:
            raise ValueError(f"span_arrangement={self.span_arrangement!r}: expected one of {SPAN_ARRANGEMENTS}")
        if self.span_scoring not in SPAN_SCORINGS:
            raise ValueError(f"span_scoring={self.span_scoring!r}: expected one of {SPAN_SCORINGS}")
        if int(self.span_len) != self.span_len or self.span_len < 1:
            raise ValueError(f"span_len={self.span_len!r}: expected a positive integer")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}: expected a value in [0, 1] (0 = off)")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: expected a value >= 0")
        if not 0.0 <= self.rescore_weight <= 1.0:
            raise ValueError(f"rescore_weight={self.rescore_weight!r}: expected a value in [0, 1] (1 = no rescoring)")
        if self.rescore_mode not in RESCORE_MODES:
            raise ValueError(f"rescore_mode={self.rescore_mode!r}: expected one of {RESCORE_MODES}")

    @classmethod
    def from_config(cls, generate_cfg: Mapping[str, Any], **overrides) -> DecodeParams:
        """From the `generate` section of `configs/magnet.py` (or config.json's "generate"), then `overrides`
        (e.g. `span_len=config.masking.span_len`). `duration` (output length, not a decoding setting) is skipped;
        any other unknown key is an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(generate_cfg).items() if k != "duration"}
        values.update(overrides)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"generate config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def chunked(self) -> bool:
        """Non-overlapping chunk mode (else token mode: stride1 spans, or single tokens when span_len is 1)."""
        return self.span_len > 1 and self.span_arrangement == "nonoverlap"

    def output_length(self, length: int) -> int:
        """Frames generated for a requested `length`: trimmed to a multiple of span_len in chunk mode (500 -> 498)."""
        return self.span_len * (length // self.span_len) if self.chunked else length

    def num_units(self, num_frames: int) -> int:
        """Re-masking units covering `num_frames` frames: whole chunks (chunk mode) or tokens."""
        return num_frames // self.span_len if self.chunked else num_frames


@dataclasses.dataclass(frozen=True)
class PrefixParams:
    """Composition-mode hybrid (docs/design.md §7.2): the first `prefix_seconds` are generated autoregressively by a
    causal MusicGen model, then MAGNeT decodes the rest with them as a frozen prompt. 0 = off. The `ar_*` sampling
    settings default to MusicGen's (docs/design.md §8): CFG 3.0, top-k 250, temperature 1.0, multinomial."""

    prefix_seconds: float = 0.0
    ar_cfg_coef: float = 3.0
    ar_temperature: float = 1.0
    ar_top_k: int = 250
    ar_top_p: float = 0.0
    ar_use_sampling: bool = True

    def __post_init__(self):
        if self.prefix_seconds < 0:
            raise ValueError(f"prefix_seconds={self.prefix_seconds!r}: expected a value >= 0 (0 = off)")
        if int(self.ar_top_k) != self.ar_top_k or self.ar_top_k < 0:
            raise ValueError(f"ar_top_k={self.ar_top_k!r}: expected an integer >= 0 (0 = off)")
        if not 0.0 <= self.ar_top_p <= 1.0:
            raise ValueError(f"ar_top_p={self.ar_top_p!r}: expected a value in [0, 1] (0 = off)")
        if self.ar_temperature < 0:
            raise ValueError(f"ar_temperature={self.ar_temperature!r}: expected a value >= 0")

    def sample_fn(self, card: int) -> musicgen.SampleFn:
        """The AR sampler for a vocabulary of `card` (a top-k of at least card keeps every token)."""
        sample = musicgen.sampler(
            temperature=self.ar_temperature,
            top_k=min(int(self.ar_top_k), card),
            top_p=self.ar_top_p,
            use_sampling=self.ar_use_sampling,
        )
        return sample if self.ar_use_sampling else musicgen.greedy


def check_companion(magnet: LMConfig, other: LMConfig, what: str) -> None:
    """A rescorer / AR-prefix model must be a causal MusicGen over the same codebooks and text-encoder width."""
    if not other.causal:
        raise ValueError(f"{what}: a non-causal (MAGNeT) model; expected a causal MusicGen model")
    for name in ("n_q", "card", "cond_dim"):
        if getattr(other, name) != getattr(magnet, name):
            raise ValueError(
                f"{what}: {name}={getattr(other, name)} but the MAGNeT model has {name}={getattr(magnet, name)}"
            )


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """Per-step values of one stage (host NumPy, length n_steps)."""

    num_masked: np.ndarray  # int32: units re-masked at each step
    cfg_coef: np.ndarray  # float32: CFG coefficient
    temperature: np.ndarray  # float32: softmax temperature (clamped at 0.01)


def _torch_linspace01(n: int) -> np.ndarray:
    """`torch.linspace(0, 1, n)` in float32 as the reference computes it on CPU: the first half `step * i`, the
    second half `1 - step * (n - 1 - i)` with one rounding (the kernel's multiply-add is fused on AVX2 builds)."""
    if n == 1:
        return np.zeros(1, np.float32)
    step = np.float32(1.0) / np.float32(n - 1)
    idx = np.arange(n)
    low = (step * idx.astype(np.float32)).astype(np.float32)
    high = (1.0 - np.float64(step) * (n - 1 - idx)).astype(np.float32)  # exact in float64, rounded once
    return np.where(idx < n // 2, low, high)


def stage_schedule(n_steps: int, n_gen_units: int, params: DecodeParams) -> StageSchedule:
    """The reference's schedule for one stage with `n_gen_units` units to generate (docs/design.md §6.4–§6.6).

    mask_p_i = cos(pi/2 * linspace(0, 1, n)_i) in float32; units re-masked = max(int(mask_p_i * n_gen_units), 1)
    (float32 product, truncated); cfg_i = mask_p_i * max_cfg + (1 - mask_p_i) * min_cfg; temperature_i =
    temperature * (n - 1 - i) / n when annealed, clamped at 0.01. The cosine is correctly rounded (torch's SIMD
    cosine is off by one ulp for some angles: no unit count differs for up to 75 steps and 1500 units, a CFG
    coefficient may differ by one float32 ulp).
    """
    angle = _torch_linspace01(n_steps) * np.float32(math.pi) * np.float32(0.5)
    mask_p = np.cos(angle.astype(np.float64)).astype(np.float32)  # correctly rounded float32 cosine
    num_masked = np.maximum((mask_p * np.float32(n_gen_units)).astype(np.float32).astype(np.int64), 1)
    rate = mask_p.astype(np.float64)
    cfg = rate * params.max_cfg + (1.0 - rate) * params.min_cfg
    left = np.arange(n_steps - 1, -1, -1, dtype=np.float64)
    temp = params.temperature * (left / n_steps) if params.anneal_temp else np.full(n_steps, params.temperature)
    return StageSchedule(num_masked.astype(np.int32), cfg.astype(np.float32), np.maximum(temp, 1e-2).astype(np.float32))


@flax.struct.dataclass
class DecodeState:
    """Loop carry of one stage.

    codes:  `[B, K, T]` int32, mask id (= card) where nothing is decoded yet.
    scores: `[B, U]` float32 re-masking scores of the stage's units (chunks or tokens); larger = re-masked first,
      `FROZEN_SCORE` = may not be re-masked.
    """

    codes: jax.Array
    scores: jax.Array


def generate_codes(
    model: LanguageModel,
    params,
    condition_inputs: TextConditioning,
    key: jax.Array,
    decode_params: DecodeParams,
    *,
    length: int,
    prompt: jax.Array | None = None,
    rescorer: tuple[LanguageModel, Any] | None = None,
) -> jax.Array:
    """MAGNeT generation of `[B, K, T']` codes.

    Args:
      model: a non-causal `LanguageModel`.
      params: its parameters (the `params` collection; boxed or plain).
      condition_inputs: `TextConditioning` of the B rows (T5 states, masks); the CFG batch adds a null twin per row.
      key: one PRNG key (split into B row keys) or `[B]` keys, one per row: a row's samples then depend only on
        its own key and inputs, not on the rest of the batch.
      decode_params: `DecodeParams`; its sampling and span settings are static (a new value compiles a new
        program), its step counts, temperature and CFG range are not.
      length: frames to generate (duration x frame rate), prompt included.
      prompt: optional `[B, K, Tp]` prompt codes (0 <= Tp < T'), written into all codebooks; their units are never
        re-masked.
      rescorer: optional (causal MusicGen `LanguageModel`, its params) with MAGNeT's n_q / card / cond_dim. When
        given and `decode_params.rescore_weight` < 1, span confidences mix its teacher-forced probabilities in
        (`rescore_fn`); its params should sit on MAGNeT's mesh under the same logical-axis rules.
    Returns:
      `[B, K, T']` int32 codes, T' = `decode_params.output_length(length)` (498 for 500 in 'nonoverlap'), prompt
      included. Inputs sharded over the batch keep that sharding (call under the mesh and logical-axis rules the
      params were sharded with; they are read at trace time).
    """
    config, dp = model.config, decode_params
    out_len = check_decoding(model, dp, length, "generate_codes")
    batch = condition_inputs.states.shape[0]
    prompt_len = 0 if prompt is None else prompt.shape[-1]
    if prompt is not None:
        if prompt.ndim != 3 or prompt.shape[:2] != (batch, config.n_q):
            raise ValueError(f"prompt: shape {tuple(prompt.shape)}, expected [{batch}, {config.n_q}, Tp]")
        if prompt_len >= out_len:
            raise ValueError(f"prompt: {prompt_len} frames, expected fewer than the {out_len} generated frames")
        init_codes = jnp.pad(
            prompt.astype(jnp.int32), ((0, 0), (0, 0), (0, out_len - prompt_len)), constant_values=config.mask_id
        )
    else:  # host array: replicated as given on every process
        init_codes = np.full((batch, config.n_q, out_len), config.mask_id, np.int32)
    check_keys(key, batch)
    rescoring = rescorer is not None and dp.rescore_weight < 1.0
    if rescorer is not None:
        check_companion(config, rescorer[0].config, "rescorer")
    prompt_lens = np.full(config.n_q, prompt_len, np.int32)
    rescorer_model, rescorer_params = (rescorer[0], nn.meta.unbox(rescorer[1])) if rescoring else (None, None)
    return _generate(
        model,
        compiled_params(dp, config.n_q, rescoring=rescoring),
        nn.meta.unbox(params),
        condition_inputs,
        key,
        init_codes,
        prompt_lens,
        schedule_tables(dp, out_len, prompt_lens),
        rescorer_model,
        rescorer_params,
        np.float32(dp.rescore_weight),
    )


def check_decoding(model: LanguageModel, decode_params: DecodeParams, length: int, what: str) -> int:
    """Validates MAGNeT decoding of `length` frames with `model`; returns the output length T'."""
    config, dp = model.config, decode_params
    if config.causal:
        raise ValueError(f"{what}: MAGNeT decoding needs a non-causal LanguageModel (config.causal=False)")
    if len(dp.decoding_steps) != config.n_q:
        raise ValueError(f"decoding_steps={list(dp.decoding_steps)}: expected {config.n_q} entries (one per codebook)")
    if dp.use_sampling and dp.top_p == 0.0 and dp.top_k > config.card:
        raise ValueError(f"top_k={dp.top_k}: expected at most card={config.card}")
    out_len = dp.output_length(length)
    if out_len < dp.span_len:
        raise ValueError(f"length={length}: expected at least span_len={dp.span_len} frames")
    return out_len


def check_keys(key: jax.Array, batch: int) -> None:
    if not _is_single_key(key) and key.shape[0] != batch:
        raise ValueError(f"key: {key.shape[0]} row keys for a batch of {batch}")


def row_keys_of(key: jax.Array, batch: int) -> jax.Array:
    """`[B]` row keys: one key split B ways, or `[B]` keys as given (typed or raw uint32)."""
    return jax.random.split(key, batch) if _is_single_key(key) else key


def schedule_tables(decode_params: DecodeParams, out_len: int, prompt_lens: np.ndarray) -> dict[str, np.ndarray]:
    """Host tables of the whole generation: `steps [K]` and `num_masked`, `cfg_coef`, `temperature` `[K, max
    steps]` (`stage_schedule` of each stage; stage k generates the units after its `prompt_lens[k]` frozen frames).

    They enter the program as arrays: step counts (within the same largest one), temperatures, CFG coefficients and
    prompt lengths do not force a recompilation."""
    dp = decode_params
    width = max(dp.decoding_steps)
    tables = {
        name: np.zeros((len(dp.decoding_steps), width), dtype)
        for name, dtype in (("num_masked", np.int32), ("cfg_coef", np.float32), ("temperature", np.float32))
    }
    for stage, n_steps in enumerate(dp.decoding_steps):
        n_gen_units = dp.num_units(out_len) - dp.num_units(int(prompt_lens[stage]))
        for name, values in dataclasses.asdict(stage_schedule(n_steps, n_gen_units, dp)).items():
            tables[name][stage, :n_steps] = values
    return {"steps": np.asarray(dp.decoding_steps, np.int32), **tables}


def compiled_params(decode_params: DecodeParams, n_q: int, *, rescoring: bool = False) -> DecodeParams:
    """The static part of `decode_params` (the program's cache key): sampling and span modes, the largest step count
    and whether rescoring is on; everything else arrives in `schedule_tables` or as a traced weight."""
    width = max(decode_params.decoding_steps)
    return dataclasses.replace(
        decode_params,
        decoding_steps=(width,) * n_q,
        temperature=1.0,
        anneal_temp=False,
        max_cfg=1.0,
        min_cfg=1.0,
        rescore_weight=0.0 if rescoring else 1.0,
    )


def _is_single_key(key: jax.Array) -> bool:
    """One PRNG key (typed `[]` or raw uint32 `[2]`) rather than `[B]` row keys."""
    return key.ndim == (0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1)


def twice(x: jax.Array) -> jax.Array:
    """`[B, ...]` -> `[2B, ...]`: each row repeated (the CFG batch's conditioned / null pair)."""
    return jnp.repeat(x, 2, axis=0)


def guided_logits_fn(
    model: LanguageModel, params, cond: TextConditioning, *, forward: Callable | None = None
) -> Callable:
    """Projects the conditioning of the B rows and computes its cross-attention keys/values (once), and returns
    `fn(codes [B, K, T], stage, cfg_coef) -> [B, T, card]` guided logits of the stage's head (one LM pass over 2B
    rows: row b at 2b with its condition, at 2b + 1 with the null condition, whose cross-attention is exactly zero
    and skipped, and the guidance mixing the pair's final states before the head: `LanguageModel.__call__` with
    B-row conditioning and `guidance`).

    `forward(variables, codes [2B, K, T], stage, attend [B, L], cross_kv (B rows), cfg_coef) -> [B, T, card]` (the
    stage's head, guided) replaces the plain LM pass (Hybrid-MAGNeT runs it on the delay layout)."""
    variables = {"params": params}
    condition = model.apply(variables, cond.states, cond.mask, method=model.project_condition)
    cross_kv = model.apply(variables, condition, method=model.cross_key_values)
    attend = None if cond.attend is None else cond.attend.astype(bool)
    if forward is None:

        def forward(variables, codes, stage, attend, cross_kv, cfg_coef):
            return model.apply(variables, codes, None, attend, stage, cross_kv=cross_kv, head=stage, guidance=cfg_coef)

    def guided_logits(codes: jax.Array, stage: jax.Array, cfg_coef: jax.Array) -> jax.Array:
        return forward(variables, twice(codes), stage, attend, cross_kv, cfg_coef)

    return guided_logits


def rescore_fn(model: LanguageModel, params, cond: TextConditioning, *, mode: str = "rank") -> Callable:
    """Projects the rescorer's own conditioning of the B rows (conditioned only: p(z|y), no CFG) and computes its
    cross-attention keys/values (once), and returns `fn(codes [B, K, T], stage)`: with `mode` 'rank', `[B, T]` the
    rescorer's probability of each token of codebook `stage` (`musicgen.token_probs`, temperature 1); with 'sample',
    `[B, T, card]` its distributions over each frame of codebook `stage` (`musicgen.frame_probs`).

    In 'rank' mode `codes` are the candidate of the current step: earlier codebooks final, the stage's codebook just
    sampled, later codebooks still the mask id (= card); in 'sample' mode they are the step's input (the stage's
    re-masked positions also the mask id). MusicGen reads that id as its special "no token" id (its delay layout's
    empty slots), the only input it knows for an absent token, so undecoded codebooks are presented as absent; the
    alternative, filling them with MAGNeT samples, would cost extra MAGNeT passes per step.
    """
    variables = {"params": params}
    condition = model.apply(variables, cond.states, cond.mask, method=model.project_condition)
    cross_kv = model.apply(variables, condition, method=model.cross_key_values)
    attend = None if cond.attend is None else cond.attend.astype(bool)

    probs_of = {"rank": musicgen.token_probs, "sample": musicgen.frame_probs}[mode]

    def rescore(codes: jax.Array, stage: jax.Array) -> jax.Array:
        probs = probs_of(model, params, codes, cross_kv, attend)
        return jax.lax.dynamic_index_in_dim(probs, stage, axis=1, keepdims=False)

    return rescore


def decode_step(
    guided_logits: Callable,
    decode_params: DecodeParams,
    state: DecodeState,
    *,
    stage: jax.Array,
    step: jax.Array,
    num_masked: jax.Array,
    cfg_coef: jax.Array,
    temperature: jax.Array,
    prompt_row: jax.Array,
    prompt_len: jax.Array,
    row_keys: jax.Array,
    mask_id: int,
    rescore: Callable | None = None,
    rescore_weight: jax.Array | float = 1.0,
) -> DecodeState:
    """One decoding step of codebook `stage` (docs/design.md §6.3): re-mask `num_masked` units by the previous scores,
    restore the prompt, run the guided LM, sample into the masked positions, score the re-masked units, freeze the rest.

    Args:
      guided_logits: from `guided_logits_fn`.
      state: carry; `state.scores` are the previous step's scores (initially 0, prompt units frozen).
      stage, step: codebook and step index (traced); they select each row's key `fold_in(fold_in(key, stage), step)`.
      num_masked, cfg_coef, temperature: this step's schedule values (`stage_schedule`).
      prompt_row: `[B, T]` the stage's codebook before decoding (prompt codes, mask id elsewhere).
      prompt_len: prompt frames Tp (traced).
      row_keys: `[B]` PRNG keys.
      mask_id: the LM's mask id (= card).
      rescore: optional `rescore_fn` of mode `decode_params.rescore_mode`. 'rank': the scores use
        `rescore_weight * p + (1 - rescore_weight) * p_rescorer` of each sampled token (paper Eq. 5), p_rescorer
        computed on the candidate codes after this step's sampling. 'sample': the rescorer's distributions on this
        step's input are mixed with MAGNeT's and tokens drawn from the mixture (`sample_mixture`), scored by their
        mixed probability.
    """
    dp = decode_params
    x = jax.lax.dynamic_index_in_dim(state.codes, stage, axis=1, keepdims=False)  # [B, T]
    if dp.chunked:
        chosen = jax.vmap(top_units_mask, in_axes=(0, None))(state.scores, num_masked)  # [B, C]
        remask = jnp.repeat(chosen, dp.span_len, axis=-1)
    elif dp.span_len > 1:
        remask = jax.vmap(least_probable_span_mask, in_axes=(0, None, None))(state.scores, num_masked, dp.span_len)
    else:
        remask = jax.vmap(top_units_mask, in_axes=(0, None))(state.scores, num_masked)
    is_prompt = jnp.arange(x.shape[-1]) < prompt_len
    x = jnp.where(is_prompt, prompt_row, jnp.where(remask, mask_id, x))
    codes = state.codes.at[:, stage].set(x)

    logits = guided_logits(codes, stage, cfg_coef)
    keys = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, stage), step))(row_keys)
    settings = dict(use_sampling=dp.use_sampling, top_p=dp.top_p, top_k=dp.top_k)
    mix = rescore is not None and dp.rescore_mode == "sample"
    if mix:
        sample = functools.partial(sample_mixture, **settings)
        other = rescore(codes, stage)  # [B, T, card] on the re-masked input
        tokens, probs = jax.vmap(sample, in_axes=(0, 0, None, 0, None))(
            keys, logits, temperature, other, rescore_weight
        )
    else:
        sample = functools.partial(sample_tokens, **settings)
        tokens, probs = jax.vmap(sample, in_axes=(0, 0, None))(keys, logits, temperature)
    masked = x == mask_id
    codes = nn.with_logical_constraint(codes.at[:, stage].set(jnp.where(masked, tokens, x)), ("batch", None, "length"))
    if rescore is not None and not mix:
        probs = rescore_weight * probs + (1.0 - rescore_weight) * rescore(codes, stage)
    if dp.chunked:
        scores = jnp.where(chosen, chunk_scores(probs, dp.span_len, dp.span_scoring), FROZEN_SCORE)
    else:
        scores = jnp.where(masked, -jnp.log(probs), FROZEN_SCORE)
    return DecodeState(codes, nn.with_logical_constraint(scores, ("batch", None)))


def initial_scores(decode_params: DecodeParams, batch: int, length: int, prompt_len: jax.Array) -> jax.Array:
    """`[B, U]` scores at the start of a stage: 0, and `FROZEN_SCORE` for the prompt's whole units."""
    dp = decode_params
    n_prompt_units = prompt_len // dp.span_len if dp.chunked else prompt_len
    units = jnp.arange(dp.num_units(length))
    return jnp.broadcast_to(
        jnp.where(units < n_prompt_units, FROZEN_SCORE, 0.0).astype(jnp.float32), (batch, units.size)
    )


def decode_stages(
    guided_logits: Callable,
    decode_params: DecodeParams,
    codes: jax.Array,
    tables,
    prompt_lens,
    row_keys: jax.Array,
    mask_id: int,
    rescore: Callable | None = None,
    rescore_weight: jax.Array | float = 1.0,
) -> jax.Array:
    """The stage loop (traceable): for k = 0..K-1 a `lax.fori_loop` of `decode_step` over `tables['steps'][k]`
    steps, codebook k's first `prompt_lens[k]` frames frozen. `codes [B, K, T]` hold the prompt (mask id elsewhere);
    `tables` from `schedule_tables`, `decode_params` from `compiled_params`."""
    batch, n_q, length = codes.shape

    def decode_stage(stage, codes):
        prompt_row = jax.lax.dynamic_index_in_dim(codes, stage, axis=1, keepdims=False)  # prompt, else mask id
        prompt_len = prompt_lens[stage]

        def body(i, state):
            return decode_step(
                guided_logits,
                decode_params,
                state,
                stage=stage,
                step=i,
                num_masked=tables["num_masked"][stage, i],
                cfg_coef=tables["cfg_coef"][stage, i],
                temperature=tables["temperature"][stage, i],
                prompt_row=prompt_row,
                prompt_len=prompt_len,
                row_keys=row_keys,
                mask_id=mask_id,
                rescore=rescore,
                rescore_weight=rescore_weight,
            )

        state = DecodeState(codes, initial_scores(decode_params, batch, length, prompt_len))
        return jax.lax.fori_loop(0, tables["steps"][stage], body, state).codes

    return jax.lax.fori_loop(0, n_q, decode_stage, codes)


@functools.partial(jax.jit, static_argnames=("model", "decode_params", "rescorer_model"))
def _generate(
    model: LanguageModel,
    decode_params: DecodeParams,
    params,
    cond: TextConditioning,
    key: jax.Array,
    init_codes: jax.Array,
    prompt_lens: jax.Array,
    tables,
    rescorer_model: LanguageModel | None,
    rescorer_params,
    rescore_weight: jax.Array,
) -> jax.Array:
    rescore = (
        None
        if rescorer_model is None
        else rescore_fn(rescorer_model, rescorer_params, cond, mode=decode_params.rescore_mode)
    )
    return decode_stages(
        guided_logits_fn(model, params, cond),
        decode_params,
        init_codes,
        tables,
        prompt_lens,
        row_keys_of(key, init_codes.shape[0]),
        model.config.mask_id,
        rescore,
        rescore_weight,
    )


@functools.partial(jax.jit, static_argnames=("model", "prefix_params", "length"))
def generate_prefix(
    model: LanguageModel,
    params,
    cond: TextConditioning,
    keys: jax.Array,
    prefix_params: PrefixParams,
    *,
    length: int,
    prompt: jax.Array | None = None,
) -> jax.Array:
    """The hybrid's autoregressive prefix: `[B, K, length]` codes from a causal MusicGen model (`generate_ar`, KV
    cache, CFG `ar_cfg_coef` on each row and its null twin), row by row: row b depends only on its conditioning,
    prompt and key `keys[b]`.

    Args:
      model, params: the causal MusicGen `LanguageModel` (cond_dim = the text encoder's width) and its params.
      cond: `TextConditioning` of the B rows; the model projects it with its own `cond_proj`.
      keys: `[B]` PRNG keys (typed or raw `[B, 2]`).
      prompt: optional `[B, K, Tp]` codes (Tp <= length) the prefix continues (audio-prompt continuation).
    """
    return musicgen.generate_rows(
        model,
        params,
        cond,
        keys,
        length=length,
        cfg_coef=prefix_params.ar_cfg_coef,
        sample_fn=prefix_params.sample_fn(model.config.card),
        prompt=prompt,
    )
