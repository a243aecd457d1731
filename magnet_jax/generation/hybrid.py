"""Hybrid-MAGNeT generation with one model (docs/design.md §4.5, §7.3): the first frames are streamed
autoregressively on MusicGen's delay layout with the key/value cache, then MAGNeT's stage loop decodes the rest with
that prefix frozen, the model reading the layout under the hybrid attention mask (`objectives.HYBRID.logits`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.generation import decoding, musicgen
from magnet_jax.generation.decoding import DecodeParams
from magnet_jax.models import objectives
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel

AR_SAMPLE = musicgen.sampler(temperature=1.0, top_k=250)  # the branch's AR prefix sampling (one object: one program)


def autoregressive_prefix(
    model: LanguageModel,
    params,
    cond: TextConditioning,
    keys: jax.Array,
    *,
    length: int,
    prefix_frames: int,
    sample_fn: musicgen.SampleFn = AR_SAMPLE,
    cfg_coef: float = 3.0,
) -> jax.Array:
    """The AR phase: layout rows < b = `prefix_frames` streamed with the key/value cache, row b from `keys[b]` alone
    (`musicgen.generate_rows`, CFG with each row's null twin). Traceable. Returns `[B, K, length]` codes: frames
    t < b - q of codebook q generated, the mask id elsewhere."""
    return musicgen.generate_rows(
        model,
        params,
        cond,
        keys,
        length=length,
        last_step=prefix_frames,
        cfg_coef=cfg_coef,
        sample_fn=sample_fn,
    )


def phase_keys(key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """`[B]` row keys of the AR phase and of the MAGNeT phase: each row key (`decoding.row_keys_of`) split in two."""
    pairs = jax.vmap(jax.random.split)(decoding.row_keys_of(key, batch))
    return pairs[:, 0], pairs[:, 1]


def generate_hybrid_codes(
    model: LanguageModel,
    params,
    condition_inputs: TextConditioning,
    key: jax.Array,
    decode_params: DecodeParams,
    *,
    length: int,
    prefix_frames: int,
    ar_sample: musicgen.SampleFn = AR_SAMPLE,
    ar_cfg: float = 3.0,
) -> jax.Array:
    """Hybrid-MAGNeT generation of `[B, K, T']` codes with one model.

    Args:
      model, params: a non-causal `LanguageModel` trained with `train.objective = "hybrid"`, its params.
      condition_inputs: `TextConditioning` of the B rows.
      key: one PRNG key (split into B row keys) or `[B]` row keys; each row key is split into the row's AR-phase
        and MAGNeT-phase keys (`phase_keys`), so a row depends only on its own key and inputs.
      decode_params: MAGNeT decoding settings of the NAR phase (`decoding.DecodeParams`).
      length: frames to generate; T' = `decode_params.output_length(length)`.
      prefix_frames: b in [0, T'], the layout rows generated autoregressively (codebook q's first b - q frames;
        b / frame_rate seconds of audio); 0 = plain MAGNeT decoding of the hybrid model.
      ar_sample: `(key, logits [B, K, card]) -> tokens [B, K]` of the AR phase (default top-k 250, temperature 1;
        `musicgen.greedy` for argmax); a static argument (`musicgen.sampler` returns the same object for the same
        settings, so the program is reused).
      ar_cfg: the AR phase's CFG coefficient.
    Returns:
      `[B, K, T']` int32 codes; the first b - q frames of codebook q are the AR phase's tokens.
    """
    config, dp = model.config, decode_params
    out_len = decoding.check_decoding(model, dp, length, "generate_hybrid_codes")
    if not 0 <= prefix_frames <= out_len:
        raise ValueError(f"prefix_frames={prefix_frames}: expected 0 <= prefix_frames <= {out_len} (generated frames)")
    decoding.check_keys(key, condition_inputs.states.shape[0])
    prompt_lens = np.maximum(prefix_frames - np.arange(config.n_q), 0).astype(np.int32)  # codebook k's AR frames
    return _generate_hybrid(
        model,
        decoding.compiled_params(dp, config.n_q),
        ar_sample,
        out_len,
        prefix_frames,
        nn.meta.unbox(params),
        condition_inputs,
        key,
        np.float32(ar_cfg),
        prompt_lens,
        decoding.schedule_tables(dp, out_len, prompt_lens),
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _generate_hybrid(
    model: LanguageModel,
    decode_params: DecodeParams,
    ar_sample,
    length: int,
    prefix_frames: int,
    params,
    cond: TextConditioning,
    key: jax.Array,
    ar_cfg,
    prompt_lens,
    tables,
) -> jax.Array:
    batch = cond.states.shape[0]
    ar_keys, nar_keys = phase_keys(key, batch)
    codes = autoregressive_prefix(
        model, params, cond, ar_keys, length=length, prefix_frames=prefix_frames, sample_fn=ar_sample, cfg_coef=ar_cfg
    )
    boundary = decoding.twice(jnp.full((batch,), prefix_frames, jnp.int32))

    def forward(variables, inputs, stage, attend, cross_kv, cfg_coef):
        logits = objectives.HYBRID.logits(
            model, variables, inputs, stage, None, attend, boundary=boundary, cross_kv=cross_kv, guidance=cfg_coef
        )
        return jax.lax.dynamic_index_in_dim(logits, stage, axis=1, keepdims=False)

    guided_logits = decoding.guided_logits_fn(model, params, cond, forward=forward)
    return decoding.decode_stages(
        guided_logits, decode_params, codes, tables, prompt_lens, nar_keys, model.config.mask_id
    )
