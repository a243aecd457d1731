"""MAGNeT's span-masked training objective and Hybrid-MAGNeT's prefix + suffix masking (docs/design.md §4.1–§4.5).

Pure functions of JAX PRNG keys; the stage is a traced value, so one compiled training step serves every stage.
Codes are `[B, K, T]`, time masks `[B, T]` bool, logits `[B, K, T, V]`.
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


def time_mask_from_noise(noise: jax.Array, rates: jax.Array, table: jax.Array | np.ndarray, span_len: int) -> jax.Array:
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
    return _extend_spans(jnp.argsort(noise, axis=-1) < count[:, None], span_len)


def _extend_spans(starts: jax.Array, span_len: int) -> jax.Array:
    """`[B, T]` span starts -> each extended to the `span_len - 1` following tokens, cut at T."""
    mask = starts
    for shift in range(1, max(span_len, 1)):
        mask = mask | jnp.pad(starts[:, :-shift], ((0, 0), (shift, 0)))
    return mask


def time_mask(
    key: jax.Array, rates: jax.Array, seq_len: int, table: jax.Array | np.ndarray, span_len: int
) -> jax.Array:
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


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, stage: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
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


def mask_batch(
    key: jax.Array,
    codes: jax.Array,
    table: jax.Array | np.ndarray,
    span_len: int,
    mask_id: int,
    stage: jax.Array | int | None = None,
) -> MaskedBatch:
    """Draws the stage (unless given), the per-sample rates and span masks for `codes [B, K, T]`, and masks the
    inputs; the same key with different given stages draws the same rates and masks."""
    stage_key, rate_key, mask_key = jax.random.split(key, 3)
    batch, n_q, length = codes.shape
    stage = sample_stage(stage_key, n_q) if stage is None else jnp.asarray(stage, jnp.int32)
    mask = time_mask(mask_key, sample_mask_rates(rate_key, batch), length, table, span_len)
    return MaskedBatch(inputs=mask_codes(codes, stage, mask, mask_id), stage=stage, mask=mask)


def span_count_tables(max_len: int, span_len: int) -> np.ndarray:
    """`[max_len + 1, 101]` int32: row n is `span_count_table(n, span_len)` (row 0 unused, zeros)."""
    return np.stack([np.zeros(101, np.int32)] + [span_count_table(n, span_len) for n in range(1, max_len + 1)])


def suffix_time_mask_from_noise(
    noise: jax.Array, rates: jax.Array, start: jax.Array, tables: jax.Array | np.ndarray, span_len: int
) -> jax.Array:
    """Span mask `[B, T]` confined to each sample's suffix [start, T) of n = T - start >= 1 tokens.

    The span starts are a uniformly random subset of the suffix: the first `count` positions of the suffix ordered
    by `noise` (prefix positions sort last); count = max(1, tables[n][round(100 r)]) for span_len > 1 (`tables`
    from `span_count_tables(T, span_len)`), max(1, round(n r)) otherwise. Spans extend forward and are cut at T.
    """
    batch, length = noise.shape
    position = jnp.arange(length)[None, :]
    n = length - start
    if span_len > 1:
        percent = jnp.round(100.0 * rates).astype(jnp.int32)
        count = jnp.maximum(jnp.asarray(tables, jnp.int32)[n, percent], 1)
    else:
        count = jnp.maximum(jnp.round(n * rates), 1.0).astype(jnp.int32)
    order = jnp.argsort(jnp.where(position < start[:, None], 2.0, noise), axis=-1)  # suffix first, random order
    starts = jnp.zeros((batch, length), bool).at[jnp.arange(batch)[:, None], order].set(position < count[:, None])
    return _extend_spans(starts, span_len)


def _prefix_frames(boundary: jax.Array, n_q: int, length: int) -> jax.Array:
    """`[B, K, T]` bool: frame t of codebook q is in the autoregressive prefix (t < boundary - q)."""
    frame = jnp.arange(length)[None, None, :]
    return frame < (boundary[:, None, None] - jnp.arange(n_q)[None, :, None])


def hybrid_inputs(codes: jax.Array, stage: jax.Array, boundary: jax.Array, mask: jax.Array, mask_id: int) -> jax.Array:
    """Hybrid-MAGNeT inputs `[B, K, T]` (frames, before the delay layout): codebooks above `stage` masked outside
    their prefix, codebook `stage` masked where `mask [B, T]` (inside its suffix), the rest ground truth."""
    batch, n_q, length = codes.shape
    level = jnp.arange(n_q)[None, :, None]
    masked = ((level > stage) & ~_prefix_frames(boundary, n_q, length)) | ((level == stage) & mask[:, None, :])
    return jnp.where(masked, jnp.asarray(mask_id, codes.dtype), codes)


def hybrid_loss_positions(
    boundary: jax.Array, stage: jax.Array, mask: jax.Array, n_q: int
) -> tuple[jax.Array, jax.Array]:
    """`(prefix, suffix)` `[B, K, T]` bool: every prefix frame (AR next-token loss) and the masked suffix frames of
    codebook `stage` (MAGNeT loss). Disjoint when `mask` lies inside the suffix."""
    prefix = _prefix_frames(boundary, n_q, mask.shape[-1])
    suffix = (jnp.arange(n_q)[None, :, None] == stage) & mask[:, None, :]
    return prefix, suffix


def hybrid_cross_entropy(
    logits: jax.Array, targets: jax.Array, boundary: jax.Array, stage: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """Sums of the Hybrid-MAGNeT loss.

    Args:
      logits: `[B, K, T, V]` frame-aligned logits (`musicgen.frame_logits` of the layout logits).
      targets: `[B, K, T]` ground-truth codes.
      boundary, stage, mask: as in `hybrid_inputs`.
    Returns:
      float32 scalars `ar_ce`, `ar_count` (prefix tokens) and `nar_ce`, `nar_count` (masked suffix tokens of codebook
      `stage`); the loss is (ar_ce + nar_ce) / (ar_count + nar_count).
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - target_logit
    prefix, suffix = hybrid_loss_positions(boundary, stage, mask, targets.shape[1])
    prefix, suffix = prefix.astype(jnp.float32), suffix.astype(jnp.float32)
    return {
        "ar_ce": jnp.sum(ce * prefix),
        "ar_count": jnp.sum(prefix),
        "nar_ce": jnp.sum(ce * suffix),
        "nar_count": jnp.sum(suffix),
    }


@flax.struct.dataclass
class HybridBatch:
    """One step's Hybrid-MAGNeT draw: `inputs [B, K, T]`, the `stage`, the layout `boundary [B]`, the suffix span
    `mask [B, T]` of codebook `stage`."""

    inputs: jax.Array
    stage: jax.Array
    boundary: jax.Array
    mask: jax.Array


def hybrid_batch(
    key: jax.Array,
    codes: jax.Array,
    tables: jax.Array | np.ndarray,
    span_len: int,
    mask_id: int,
    stage: jax.Array | int | None = None,
) -> HybridBatch:
    """Draws the stage (unless given), boundaries b ~ U[0, T), cosine rates and suffix span masks for `codes
    [B, K, T]`; the same key with different given stages draws the same boundaries, rates and noise."""
    stage_key, boundary_key, rate_key, mask_key = jax.random.split(key, 4)
    batch, n_q, length = codes.shape
    stage = sample_stage(stage_key, n_q) if stage is None else jnp.asarray(stage, jnp.int32)
    boundary = jax.random.randint(boundary_key, (batch,), 0, length, dtype=jnp.int32)
    noise = jax.random.uniform(mask_key, (batch, length), jnp.float32)
    mask = suffix_time_mask_from_noise(
        noise, sample_mask_rates(rate_key, batch), jnp.maximum(boundary - stage, 0), tables, span_len
    )
    return HybridBatch(
        inputs=hybrid_inputs(codes, stage, boundary, mask, mask_id), stage=stage, boundary=boundary, mask=mask
    )
