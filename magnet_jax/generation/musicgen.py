"""MusicGen: the autoregressive model over the delay codebook pattern (docs/design.md §8).

Delay layout for K codebooks and T frames: S = T + K steps; step 0 is all special tokens; step s holds frame
t = s - 1 - q of codebook q when 0 <= t < T and the special id otherwise. Generation streams steps 1 .. S-1 with a
self-attention key/value cache, one compiled `lax.fori_loop`, classifier-free guidance on the `[cond; null]` batch
(`stream_layout`; it also streams the autoregressive prefix of Hybrid-MAGNeT, `magnet_jax.generation.hybrid`).
`frame_logits` aligns layout logits with frames.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from magnet_jax.generation.sampling import sample_tokens
from magnet_jax.models import codebook_patterns
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, init_cache

SampleFn = Callable[[jax.Array, jax.Array], jax.Array]  # (key, logits [B, K, card]) -> tokens [B, K]


def greedy(key: jax.Array, logits: jax.Array) -> jax.Array:
    del key
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.cache
def sampler(*, temperature: float = 1.0, top_k: int = 250, top_p: float = 0.0, use_sampling: bool = True) -> SampleFn:
    """MusicGen's sampling (defaults: temperature 1, top-k 250, multinomial), built on the shared sampling rules.

    The same settings give the same function object, so jitted generation (`sample_fn` is static) compiles once."""

    def sample(key, logits):
        return sample_tokens(
            key, logits, jnp.float32(max(temperature, 1e-2)), use_sampling=use_sampling, top_p=top_p, top_k=top_k
        )[0]

    return sample


def stream_layout(
    model: LanguageModel,
    params,
    condition: jax.Array,
    cond_attend: jax.Array | None,
    key: jax.Array,
    *,
    length: int,
    last_step: int | None = None,
    cfg_coef: float | None = 3.0,
    sample_fn: SampleFn = greedy,
    forced: jax.Array | None = None,
) -> jax.Array:
    """Streams delay-layout steps 1 .. `last_step` (default S - 1, the whole layout) with the key/value cache.

    Traceable (call it inside `jax.jit`); the arguments are those of `generate_ar`, `forced` being the delay layout
    `[B, K, S]` of forced tokens (special where free). The model attends causally whatever its `causal` flag (the
    autoregressive prefix of Hybrid-MAGNeT). Returns the layout `[B, K, S]`, special after `last_step`.
    """
    config = model.config
    rows = condition.shape[0]
    batch = rows if cfg_coef is None else rows // 2
    n_q, steps, special = config.n_q, length + config.n_q, config.mask_id
    last_step = steps - 1 if last_step is None else last_step
    valid = codebook_patterns.delay_valid(n_q, steps)
    variables = {"params": params}
    cross_kv = model.apply(variables, condition, method=model.cross_key_values)
    sequence = jnp.full((batch, n_q, steps), special, jnp.int32)

    def step(s, carry):
        sequence, cache, key = carry
        key, sub = jax.random.split(key)
        tokens = jax.lax.dynamic_slice_in_dim(sequence, s - 1, 1, axis=2)
        if cfg_coef is not None:
            tokens = jnp.concatenate([tokens, tokens], axis=0)
        logits, cache = model.apply(variables, tokens, None, cond_attend, cross_kv=cross_kv, cache=cache)
        logits = logits[:, :, 0]
        if cfg_coef is not None:
            cond, uncond = jnp.split(logits, 2, axis=0)
            logits = uncond + cfg_coef * (cond - uncond)
        new = jnp.where(jax.lax.dynamic_slice_in_dim(valid, s, 1, axis=1)[None, :, 0], sample_fn(sub, logits), special)
        if forced is not None:
            pinned = jax.lax.dynamic_slice_in_dim(forced, s, 1, axis=2)[:, :, 0]
            new = jnp.where(pinned != special, pinned, new)
        sequence = jax.lax.dynamic_update_slice_in_dim(sequence, new[:, :, None], s, axis=2)
        return sequence, cache, key

    cache = init_cache(config, rows, last_step + 1)
    sequence, _, _ = jax.lax.fori_loop(1, last_step + 1, step, (sequence, cache, key))
    return sequence


@functools.partial(jax.jit, static_argnames=("model", "length", "cfg_coef", "sample_fn", "return_layout"))
def generate_ar(
    model: LanguageModel,
    params,
    condition: jax.Array,
    cond_attend: jax.Array | None,
    key: jax.Array,
    *,
    length: int,
    cfg_coef: float | None = 3.0,
    sample_fn: SampleFn = greedy,
    prompt: jax.Array | None = None,
    return_layout: bool = False,
) -> jax.Array:
    """Autoregressive generation of `length` frames (one compiled program per model, length and sampler).

    Args:
      model, params: a `LanguageModel` (causal, or a Hybrid-MAGNeT model used causally) and its params.
      condition: `[2B, L, D]` projected conditioning, conditioned rows then null rows (CFG), or `[B, L, D]` when
        `cfg_coef` is None (no guidance).
      cond_attend: `[rows, L]` bool key mask for cross-attention (see `LanguageModel.__call__`), or None.
      key: PRNG key for sampling (one split per step).
      length: T, frames to generate (prompt included).
      cfg_coef: guidance `uncond + cfg (cond - uncond)` on the last-step logits; None = no guidance.
      sample_fn: `(key, logits [B, K, card]) -> tokens [B, K]`; default greedy (argmax).
      prompt: `[B, K, Tp]` codes forced at the start (audio-prompt continuation), Tp <= length.
      return_layout: also return the raw delay-layout sequence `[B, K, T + K]`.
    Returns:
      `[B, K, T]` int32 codes (and the layout when asked).
    """
    forced = None if prompt is None else codebook_patterns.forced_layout(prompt, length, model.config.mask_id)
    sequence = stream_layout(
        model, params, condition, cond_attend, key, length=length, cfg_coef=cfg_coef, sample_fn=sample_fn, forced=forced
    )
    codes = codebook_patterns.revert_delay_pattern(sequence)
    return (codes, sequence) if return_layout else codes


def generate_rows(
    model: LanguageModel,
    params,
    cond: TextConditioning,
    keys: jax.Array,
    *,
    length: int,
    last_step: int | None = None,
    cfg_coef: float = 3.0,
    sample_fn: SampleFn = greedy,
    prompt: jax.Array | None = None,
) -> jax.Array:
    """Row-independent autoregressive generation: row b from its own text and `keys[b]` only (each row streamed
    with its null-condition twin for CFG, `vmap`ped over rows), so a sample does not depend on its batch mates.

    Traceable. `cond` holds the rows' text-encoder states (the model projects them with its own `cond_proj`); `keys
    [B]`; `last_step` the last layout step streamed (default all: `length`
    whole frames; Hybrid-MAGNeT's prefix streams fewer); `prompt [B, K, Tp]` forced frames. Returns `[B, K, length]`
    codes, the special id (= card) where nothing was generated.
    """
    special = model.config.mask_id

    def one_row(row_states, row_mask, row_attend, key, row_prompt):
        condition = model.apply(
            {"params": params},
            jnp.stack([row_states, jnp.zeros_like(row_states)]),
            jnp.stack([row_mask, jnp.zeros_like(row_mask)]),
            method=model.project_condition,
        )
        forced = None if row_prompt is None else codebook_patterns.forced_layout(row_prompt[None], length, special)
        sequence = stream_layout(
            model,
            params,
            condition,
            jnp.stack([row_attend, row_attend]),
            key,
            length=length,
            last_step=last_step,
            cfg_coef=cfg_coef,
            sample_fn=sample_fn,
            forced=forced,
        )
        return codebook_patterns.revert_delay_pattern(sequence)[0]

    attend = jnp.ones(cond.mask.shape, bool) if cond.attend is None else cond.attend.astype(bool)
    return jax.vmap(one_row)(cond.states, cond.mask, attend, keys, prompt)


def frame_probs(model: LanguageModel, params, codes: jax.Array, cross_kv, attend: jax.Array | None = None) -> jax.Array:
    """Teacher-forced next-token distributions of `codes` under a causal MusicGen model: one pass over their delay
    layout (steps 0 .. T + K - 2; the last step predicts nothing), head q at step t + q giving frame t of codebook q.

    Args:
      model, params: a causal `LanguageModel` and its params.
      codes: `[B, K, T]` int32 in [0, card]; `card` (the special id) marks absent tokens, fed as such.
      cross_kv: `model.cross_key_values(condition)` of the B rows' projected conditioning (no CFG).
      attend: `[B, L]` bool cross-attention key mask, or None.
    Returns:
      `[B, K, T, card]` float32: the softmax (temperature 1) over frame t of codebook q given the layout before it.
    """
    layout = codebook_patterns.apply_delay_pattern(codes, model.config.mask_id)[:, :, :-1]
    logits = model.apply({"params": params}, layout, None, attend, cross_kv=cross_kv)  # [B, K, T + K - 1, card]
    return jax.nn.softmax(codebook_patterns.frame_logits(logits, codes.shape[-1]), axis=-1)


def token_probs(model: LanguageModel, params, codes: jax.Array, cross_kv, attend: jax.Array | None = None) -> jax.Array:
    """Teacher-forced probabilities of `codes` (arguments as `frame_probs`): `[B, K, T]` float32, the probability of
    each given token; 0 where it is the special id."""
    special = model.config.mask_id
    probs = frame_probs(model, params, codes, cross_kv, attend)
    picked = jnp.take_along_axis(probs, jnp.minimum(codes, special - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(codes == special, 0.0, picked)
