"""Hybrid-MAGNeT (magnet-spec §9.2, §9.4): one non-causal model trained with an autoregressive prefix and MAGNeT
span masking over the MusicGen delay layout; at inference the first seconds are generated autoregressively with the
key/value cache and the rest is decoded by MAGNeT's iterative decoding with that prefix frozen.

Layout. Codes `[B, K, T]` enter the model as `musicgen.apply_delay_pattern(codes', special=mask_id)`: `[B, K, S]`,
S = T + K, column 0 all special, column s holding frame s - 1 - q of codebook q. Logits at layout row r of head q
predict frame t = r - q of codebook q (`musicgen.frame_logits`).

Training (`config.train.objective = "hybrid"`, `masking.hybrid_batch`): per batch a stage k, per sample a boundary b
uniform in [0, T); layout rows < b are the prefix, i.e. frames t < b - q of codebook q.
- inputs codes': codebooks above k masked from frame b - q on; codebook k span-masked inside its suffix
  [max(b - k, 0), T) (cosine rate, span table of the suffix length); lower codebooks and prefix frames ground truth;
- self-attention (`attention.hybrid_attention_mask`): rows r < b causal; rows r >= b the stage-k MAGNeT mask
  shifted by the delay (keys j in [1 + k, 1 + k + T), band |j - 1 - r| <= subcodes_context for k >= 1);
- loss: one cross-entropy mean over every prefix token (AR next-token loss, all codebooks) and the masked suffix
  tokens of codebook k (`masking.hybrid_cross_entropy`); `ar_loss` / `nar_loss` are reported beside it.

Inference (`generate_hybrid_codes`): the prefix rows r < b (`prefix_frames`) are streamed with the cache
(`musicgen.stream_layout`: CFG 3, top-k 250, temperature 1 by default, as audiocraft's hybrid branch); then codebook
stages k = 0..K-1 are decoded with `decoding.decode_step`, the LM pass building the layout under the hybrid mask
with boundary b and stage k, the first b - k frames of codebook k frozen as the prompt.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import musicgen
from magnet_jax.attention import hybrid_attention_mask
from magnet_jax.decoding import (DecodeParams, DecodeState, TextConditioning, _twice, _with_null_rows, decode_step,
                                 initial_scores, stage_schedule)
from magnet_jax.lm import LanguageModel

AR_SAMPLE = musicgen.sampler(temperature=1.0, top_k=250)  # the branch's AR prefix sampling (one object: one program)


def hybrid_logits(model: LanguageModel, variables, inputs: jax.Array, boundary: jax.Array, stage: jax.Array,
                  condition: jax.Array | None, cond_attend: jax.Array | None = None, *, cross_kv=None) -> jax.Array:
    """Frame-aligned logits `[B, K, T, card]` of the model on the delay layout of `inputs [B, K, T]` under the
    hybrid mask of `boundary [B]` and `stage` (traced ok); `condition`, `cond_attend`, `cross_kv` as in
    `LanguageModel.__call__`."""
    config = model.config
    _, n_q, length = inputs.shape
    layout = musicgen.apply_delay_pattern(inputs, config.mask_id)
    mask = hybrid_attention_mask(boundary, stage, length=length, n_q=n_q, subcodes_context=config.subcodes_context)
    logits = model.apply(variables, layout, condition, cond_attend, cross_kv=cross_kv, self_mask=mask)
    return nn.with_logical_constraint(musicgen.frame_logits(logits, length), ("batch", None, "length", "act_vocab"))


def autoregressive_prefix(model: LanguageModel, params, cond: TextConditioning, key: jax.Array, *, length: int,
                          prefix_frames: int, sample_fn: musicgen.SampleFn = AR_SAMPLE,
                          cfg_coef: float = 3.0) -> jax.Array:
    """The AR phase: layout rows < b = `prefix_frames` streamed with the key/value cache (`musicgen.stream_layout`,
    CFG on the `[cond; null]` batch). Traceable. Returns `[B, K, length]` codes: frames t < b - q of codebook q
    generated, the mask id elsewhere."""
    def with_null_block(x):  # [B, ...] -> [2B, ...]: the rows, then as many null rows (generate_ar's CFG layout)
        return jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    condition = model.apply({"params": params}, with_null_block(cond.states), with_null_block(cond.mask),
                            method=model.project_condition)
    attend = None if cond.attend is None else jnp.concatenate([cond.attend, cond.attend], axis=0).astype(bool)
    sequence = musicgen.stream_layout(model, params, condition, attend, key, length=length, last_step=prefix_frames,
                                      cfg_coef=cfg_coef, sample_fn=sample_fn)
    return musicgen.revert_delay_pattern(sequence)


def guided_stage_logits_fn(model: LanguageModel, params, cond: TextConditioning, boundary: jax.Array) -> Callable:
    """`decoding.guided_logits_fn` for the hybrid model: `fn(codes [B, K, T], stage, cfg_coef) -> [B, T, card]`,
    head `stage`'s rows [stage, stage + T) of the layout under the hybrid mask (boundary `[B]`), CFG-guided over the
    interleaved `[row, null twin]` batch."""
    variables = {"params": params}
    condition = model.apply(variables, _with_null_rows(cond.states), _with_null_rows(cond.mask),
                            method=model.project_condition)
    cross_kv = model.apply(variables, condition, method=model.cross_key_values)
    attend = None if cond.attend is None else _twice(cond.attend.astype(bool))

    def guided_logits(codes: jax.Array, stage: jax.Array, cfg_coef: jax.Array) -> jax.Array:
        batch, _, length = codes.shape
        logits = hybrid_logits(model, variables, _twice(codes), _twice(boundary), stage, None, attend,
                               cross_kv=cross_kv)
        logits = jax.lax.dynamic_index_in_dim(logits, stage, axis=1, keepdims=False).reshape(batch, 2, length, -1)
        return logits[:, 1] + (logits[:, 0] - logits[:, 1]) * cfg_coef
    return guided_logits


def generate_hybrid_codes(model: LanguageModel, params, condition_inputs: TextConditioning, key: jax.Array,
                          decode_params: DecodeParams, *, length: int, prefix_frames: int,
                          ar_sample: musicgen.SampleFn = AR_SAMPLE, ar_cfg: float = 3.0) -> jax.Array:
    """Hybrid-MAGNeT generation of `[B, K, T']` codes with one model.

    Args:
      model, params: a non-causal `LanguageModel` trained with `train.objective = "hybrid"`, its params.
      condition_inputs: `TextConditioning` of the B rows.
      key: one PRNG key; `split(key)` gives the AR phase's key and the NAR phase's (split into B row keys).
      decode_params: MAGNeT decoding settings of the NAR phase (`decoding.DecodeParams`).
      length: frames to generate; T' = `decode_params.output_length(length)`.
      prefix_frames: b in [0, T'], the layout rows generated autoregressively (codebook q's first b - q frames;
        b / frame_rate seconds of audio); 0 = plain MAGNeT decoding of the hybrid model.
      ar_sample: `(key, logits [B, K, card]) -> tokens [B, K]` of the AR phase (default top-k 250, temperature 1;
        `musicgen.greedy` for argmax); it is a static argument (pass the same object to reuse the program).
      ar_cfg: the AR phase's CFG coefficient.
    Returns:
      `[B, K, T']` int32 codes; the first b - q frames of codebook q are the AR phase's tokens.
    """
    config, dp = model.config, decode_params
    if config.causal:
        raise ValueError("generate_hybrid_codes: a Hybrid-MAGNeT model is non-causal (model.causal=False)")
    if len(dp.decoding_steps) != config.n_q:
        raise ValueError(f"decoding_steps={list(dp.decoding_steps)}: expected {config.n_q} entries (one per codebook)")
    out_len = dp.output_length(length)
    if out_len < dp.span_len:
        raise ValueError(f"length={length}: expected at least span_len={dp.span_len} frames")
    if not 0 <= prefix_frames <= out_len:
        raise ValueError(f"prefix_frames={prefix_frames}: expected 0 <= prefix_frames <= {out_len} (generated frames)")
    if key.ndim != (0 if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else 1):
        raise ValueError(f"key: expected one PRNG key, got shape {tuple(key.shape)}")
    width = max(dp.decoding_steps)
    tables = {name: np.zeros((config.n_q, width), dtype) for name, dtype in
              (("num_masked", np.int32), ("cfg_coef", np.float32), ("temperature", np.float32))}
    for stage, n_steps in enumerate(dp.decoding_steps):
        n_gen_units = dp.num_units(out_len) - dp.num_units(max(prefix_frames - stage, 0))
        for name, values in dataclasses.asdict(stage_schedule(n_steps, n_gen_units, dp)).items():
            tables[name][stage, :n_steps] = values
    program = dataclasses.replace(dp, decoding_steps=(width,) * config.n_q, temperature=1.0, anneal_temp=False,
                                  max_cfg=1.0, min_cfg=1.0)
    return _generate_hybrid(model, program, ar_sample, out_len, prefix_frames, nn.meta.unbox(params),
                            condition_inputs, key, np.float32(ar_cfg), np.asarray(dp.decoding_steps, np.int32), tables)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _generate_hybrid(model: LanguageModel, decode_params: DecodeParams, ar_sample, length: int, prefix_frames: int,
                     params, cond: TextConditioning, key: jax.Array, ar_cfg, steps, tables) -> jax.Array:
    batch = cond.states.shape[0]
    ar_key, nar_key = jax.random.split(key)
    codes = autoregressive_prefix(model, params, cond, ar_key, length=length, prefix_frames=prefix_frames,
                                  sample_fn=ar_sample, cfg_coef=ar_cfg)
    boundary = jnp.full((batch,), prefix_frames, jnp.int32)
    guided_logits = guided_stage_logits_fn(model, params, cond, boundary)
    row_keys = jax.random.split(nar_key, batch)

    def decode_stage(stage, codes):
        prompt_len = jnp.maximum(prefix_frames - stage, 0)  # codebook `stage`'s AR frames, frozen
        prompt_row = jax.lax.dynamic_index_in_dim(codes, stage, axis=1, keepdims=False)

        def body(i, state):
            return decode_step(guided_logits, decode_params, state, stage=stage, step=i,
                               num_masked=tables["num_masked"][stage, i], cfg_coef=tables["cfg_coef"][stage, i],
                               temperature=tables["temperature"][stage, i], prompt_row=prompt_row,
                               prompt_len=prompt_len, row_keys=row_keys, mask_id=model.config.mask_id)
        state = DecodeState(codes, initial_scores(decode_params, batch, length, prompt_len))
        return jax.lax.fori_loop(0, steps[stage], body, state).codes

    return jax.lax.fori_loop(0, model.config.n_q, decode_stage, codes)
