"""MAGNeT's span-masked training objective (magnet-spec §4.2, §5.2–5.3).

One codebook stage s per batch, uniform over the K codebooks; per sample a mask rate r = cos(π/2 · u), u ~ U(0, 1);
a mask over time made of spans of `span_len` tokens whose number comes from the rate -> span-count lookup table;
codebooks above s fully masked with the mask id, codebooks below s kept; cross-entropy on the masked tokens of
codebook s only, averaged over all masked tokens of the batch. Everything is a pure function of JAX PRNG keys and
the stage is a traced value, so one compiled training step serves every stage.

Public API:
  span_count_table(seq_len, span_len) -> np.ndarray [101] int32      u(m) for m = 0..100 percent
  sample_stage(key, n_q) -> int32 scalar
  sample_mask_rates(key, batch) -> [B] float32                       cos(π/2 · U(0, 1))
  time_mask_from_noise(noise [B, T], rates [B], table, span_len) -> bool [B, T]
  time_mask(key, rates [B], seq_len, table, span_len) -> bool [B, T]
  mask_codes(codes [B, K, T], stage, time_mask [B, T], mask_id) -> inputs [B, K, T]
  masked_cross_entropy(logits [B, K, T, V], targets [B, K, T], stage, time_mask [B, T]) -> (ce_sum, count)
  MaskedBatch, mask_batch(key, codes, table, span_len, mask_id) -> MaskedBatch
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def span_count_table(seq_len: int, span_len: int) -> np.ndarray:
    """The reference's rate -> span-count lookup table for sequences of `seq_len` tokens.

    The expected masked fraction of the union of u distinct random span starts, each covering `span_len` tokens, is
    1 - C(T - L, u) / C(T, u) (paper App. C), accumulated as the running product Π_{j<u} (T - L - j) / (T - j) in
    float64 for u = 0..T-1. Entry m (0..100) is the first u whose expected fraction is >= m / 100.

    Returns:
      `[101]` int32; e.g. T = 500, L = 3: u(10%) = 18, u(50%) = 103, u(100%) = 498.
    """
    if seq_len < 1 or span_len < 1:
        raise ValueError(f"span_count_table: seq_len={seq_len} and span_len={span_len} must be >= 1")
    expected = np.zeros(seq_len, np.float64)
    ratio = 1.0
    for u in range(1, seq_len):
        ratio *= (seq_len - span_len - (u - 1)) / (seq_len - (u - 1))
        expected[u] = 1.0 - ratio
    targets = np.arange(101, dtype=np.float64) / 100.0
    return np.searchsorted(expected, targets, side="left").astype(np.int32)


def sample_stage(key: jax.Array, n_q: int) -> jax.Array:
    """The codebook trained this step, uniform over `0..n_q-1` (one for the whole batch, as the reference)."""
    return jax.random.randint(key, (), 0, n_q, dtype=jnp.int32)


def sample_mask_rates(key: jax.Array, batch: int) -> jax.Array:
    """Per-sample mask rates `[B]` = cos(π/2 · u), u ~ U(0, 1) (continuous cosine schedule)."""
    return jnp.cos(0.5 * jnp.pi * jax.random.uniform(key, (batch,), jnp.float32))


def time_mask_from_noise(noise: jax.Array, rates: jax.Array, table: jax.Array | np.ndarray,
                         span_len: int) -> jax.Array:
    """Span mask `[B, T]` (True = masked) from iid uniform `noise [B, T]` and `rates [B]`.

    Span starts are the positions t with `argsort(noise)[t] < k` (the reference's construction; a uniformly random
    k-subset of the positions):
    - span_len > 1: k = max(1, table[round(100 r)]) starts, each extended to the `span_len - 1` following tokens;
      spans starting near the end are cut at T (a start at T - 1 masks one token), never wrapped;
    - span_len <= 1: k = max(1, round(T r)) single tokens.
    Rounding is half-to-even like `torch.round`.
    """
    _, length = noise.shape
    if span_len > 1:
        percent = jnp.round(100.0 * rates).astype(jnp.int32)
        count = jnp.maximum(jnp.asarray(table, jnp.int32)[percent], 1)
    else:
        count = jnp.maximum(jnp.round(length * rates), 1.0).astype(jnp.int32)
    mask = jnp.argsort(noise, axis=-1) < count[:, None]
    starts = mask
    for shift in range(1, max(span_len, 1)):
        mask = mask | jnp.pad(starts[:, :-shift], ((0, 0), (shift, 0)))
    return mask


def time_mask(key: jax.Array, rates: jax.Array, seq_len: int, table: jax.Array | np.ndarray,
              span_len: int) -> jax.Array:
    """Random span mask `[B, T]` for per-sample `rates [B]` (see `time_mask_from_noise`)."""
    noise = jax.random.uniform(key, (rates.shape[0], seq_len), jnp.float32)
    return time_mask_from_noise(noise, rates, table, span_len)


def mask_codes(codes: jax.Array, stage: jax.Array, mask: jax.Array, mask_id: int) -> jax.Array:
    """Model inputs `[B, K, T]`: codebook `stage` masked where `mask [B, T]`, codebooks above it fully masked.

    Codebooks below `stage` stay ground truth (teacher forcing). `stage` may be traced.
    """
    level = jnp.arange(codes.shape[1])[None, :, None]
    masked = (level > stage) | ((level == stage) & mask[:, None, :])
    return jnp.where(masked, jnp.asarray(mask_id, codes.dtype), codes)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, stage: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of codebook `stage` on the masked tokens only.

    Args:
      logits: `[B, K, T, V]` (any float dtype; computed in float32).
      targets: `[B, K, T]` int ground-truth codes.
      stage: the codebook being trained (traced ok).
      mask: `[B, T]` bool, the masked positions of codebook `stage`.
    Returns:
      `(ce_sum, count)`: summed cross-entropy over the masked tokens and their number (float32 scalars); the
      reference's loss is `ce_sum / count`, a mean over all masked tokens of the batch. Sums are returned so that
      microbatch accumulation reproduces the big-batch mean exactly.
    """
    logits_s = jax.lax.dynamic_index_in_dim(logits, stage, axis=1, keepdims=False).astype(jnp.float32)
    targets_s = jax.lax.dynamic_index_in_dim(targets, stage, axis=1, keepdims=False)
    log_z = jax.nn.logsumexp(logits_s, axis=-1)
    target_logit = jnp.take_along_axis(logits_s, targets_s[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weight = mask.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * weight), jnp.sum(weight)


@flax.struct.dataclass
class MaskedBatch:
    """One step's masking: `inputs [B, K, T]` for the LM, the trained `stage`, the loss `mask [B, T]`."""
    inputs: jax.Array
    stage: jax.Array
    mask: jax.Array


def mask_batch(key: jax.Array, codes: jax.Array, table: jax.Array | np.ndarray, span_len: int,
               mask_id: int) -> MaskedBatch:
    """Draws the stage, the per-sample rates and span masks for `codes [B, K, T]`, and masks the inputs."""
    stage_key, rate_key, mask_key = jax.random.split(key, 3)
    batch, n_q, length = codes.shape
    stage = sample_stage(stage_key, n_q)
    mask = time_mask(mask_key, sample_mask_rates(rate_key, batch), length, table, span_len)
    return MaskedBatch(inputs=mask_codes(codes, stage, mask, mask_id), stage=stage, mask=mask)
