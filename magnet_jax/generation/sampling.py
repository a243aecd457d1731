"""Token sampling and span re-masking rules of MAGNeT's iterative decoder (docs/design.md §6.3, §6.7, §6.9).

Everything here works on one batch row (the decoder `vmap`s it), is jittable, and takes `k` (how many units to
re-mask) as a traced value, so one compiled loop body serves every decoding step.

Tie-breaking: where the reference relies on `torch.topk` / `torch.argsort` (whose order among equal scores is
unspecified), units with equal scores are taken in index order; the nucleus keeps every token tied at its threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FROZEN_SCORE = -1e4  # the reference's DONT_REMASK_ME_SCORE: units that may not be re-masked


def top_k_probs(probs: jax.Array, k: int) -> jax.Array:
    """Keeps probabilities >= the k-th largest (ties kept) and renormalises. `[..., V]` -> `[..., V]`."""
    kth = jax.lax.top_k(probs, k)[0][..., -1:]
    kept = jnp.where(probs >= kth, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def top_p_threshold(probs: jax.Array, p: float) -> jax.Array:
    """The smallest probability the nucleus keeps, `[..., V]` -> `[..., 1]`.

    The reference sorts descending and drops token j when the mass before it (`cumsum_j - p_j`) exceeds p. That mass
    is the total of the strictly larger probabilities, which falls as the probability rises, so the kept tokens are
    exactly those at or above a threshold: the smallest float t with `sum(probs > t) <= p`, found by bisection over
    float32 bit patterns (30 vectorised passes over V instead of a sort; tokens tied at the threshold are all kept).
    """

    def mass_above(bits):
        threshold = jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]
        return jnp.sum(jnp.where(probs > threshold, probs, 0.0), axis=-1)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        fits = mass_above(mid) <= p
        return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

    one = jax.lax.bitcast_convert_type(jnp.float32(1.0), jnp.int32)  # < 2**30: 30 halvings reach one value
    lo = jnp.zeros(probs.shape[:-1], jnp.int32)
    _, hi = jax.lax.fori_loop(0, 30, bisect, (lo, jnp.full_like(lo, one)))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)[..., None]


def sample_top_p(key: jax.Array, probs: jax.Array, p: float) -> jax.Array:
    """Nucleus sampling (docs/design.md §6.7): the most probable tokens whose preceding mass is <= p (the most probable
    one
    always), renormalised. `probs [..., V]` -> tokens `[...]` int32."""
    return sample_categorical(key, jnp.where(probs >= top_p_threshold(probs, p), probs, 0.0))


def sample_categorical(key: jax.Array, weights: jax.Array) -> jax.Array:
    """One draw per row of `weights [..., V]` (non-negative, unnormalised) by inverting the cumulative sum with one
    uniform per row (V times fewer random bits than Gumbel-max). Zero weights are never drawn."""
    cdf = jnp.cumsum(weights, axis=-1)
    u = jax.random.uniform(key, weights.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), weights.shape[-1] - 1).astype(jnp.int32)


def sample_tokens(
    key: jax.Array, logits: jax.Array, temperature: jax.Array, *, use_sampling: bool, top_p: float, top_k: int
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per position and returns the probability the re-masking scores are computed from.

    Args:
      key: PRNG key (unused in greedy mode).
      logits: `[T, V]` guided logits of the codebook being decoded.
      temperature: scalar (already clamped to >= 0.01 by the schedule).
      use_sampling: False = greedy (argmax of the logits); the confidences still use the tempered softmax.
      top_p: > 0 selects nucleus sampling; else top_k > 0 selects top-k; else plain multinomial.
    Returns:
      tokens `[T]` int32 and their probabilities `[T]` under the tempered softmax (under the truncated, renormalised
      distribution for top-k, as the reference filters its probabilities in place).
    """
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    if not use_sampling:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    elif top_p > 0.0:
        tokens = sample_top_p(key, probs, top_p)
    else:
        if top_k > 0:
            probs = top_k_probs(probs, top_k)
        tokens = sample_categorical(key, probs)
    return tokens, jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def sample_mixture(
    key: jax.Array,
    logits: jax.Array,
    temperature: jax.Array,
    other: jax.Array,
    weight: jax.Array,
    *,
    use_sampling: bool,
    top_p: float,
    top_k: int,
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per position from the mixture `weight * p + (1 - weight) * other` (paper Eq. 5 read as the
    distribution sampled from), p being the distribution `sample_tokens` draws from (tempered softmax, truncated by
    top-p or top-k and renormalised).

    Args:
      logits, temperature, use_sampling, top_p, top_k: as `sample_tokens`.
      other: `[T, V]` the second model's distributions (rows summing to 1).
      weight: scalar w in [0, 1] (traced ok).
    Returns:
      tokens `[T]` int32 and their mixed confidences `weight * q + (1 - weight) * other[token]`, q being the
      confidence `sample_tokens` would return (the tempered softmax; truncated and renormalised for top-k). Greedy
      (use_sampling False) takes the argmax of `weight * softmax(logits / temperature) + (1 - weight) * other`.
    """
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    if use_sampling and top_p == 0.0 and top_k > 0:
        probs = top_k_probs(probs, top_k)
    if not use_sampling:
        tokens = jnp.argmax(weight * probs + (1.0 - weight) * other, axis=-1).astype(jnp.int32)
    else:
        own = jnp.where(probs >= top_p_threshold(probs, top_p), probs, 0.0) if top_p > 0.0 else probs
        own = own / jnp.sum(own, axis=-1, keepdims=True)
        tokens = sample_categorical(key, weight * own + (1.0 - weight) * other)

    def pick(p):
        return jnp.take_along_axis(p, tokens[..., None], axis=-1)[..., 0]

    return tokens, weight * pick(probs) + (1.0 - weight) * pick(other)


def top_units_mask(scores: jax.Array, k: jax.Array) -> jax.Array:
    """True for the `k` largest scores of `[U]` (equal scores in index order). `k` may be traced."""
    order = jnp.argsort(scores, descending=True, stable=True)
    return rank_from_order(order) < k


def rank_from_order(order: jax.Array) -> jax.Array:
    """Inverse permutation of `[U]`: the position of each unit in `order`."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[-1], dtype=order.dtype))


def chunk_scores(token_probs: jax.Array, span_len: int, scoring: str) -> jax.Array:
    """Re-masking score of each non-overlapping chunk, `[..., C * L]` -> `[..., C]`: 'max' = 1 - max prob,
    'prod' = sum of -log prob (larger = less confident)."""
    chunks = token_probs.reshape(*token_probs.shape[:-1], -1, span_len)
    if scoring == "max":
        return 1.0 - jnp.max(chunks, axis=-1)
    return _sum_left_to_right(-jnp.log(chunks))


def _sum_left_to_right(x: jax.Array) -> jax.Array:
    """Sum over the last (short) axis in index order, as the reference's span sums."""
    total = x[..., 0]
    for j in range(1, x.shape[-1]):
        total = total + x[..., j]
    return total


def _round_half_even_mean(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Python's `round(0.5 * (lo + hi))` for integers (ties to even)."""
    s = lo + hi
    half = s // 2
    return jnp.where((s % 2 == 1) & (half % 2 == 1), half + 1, half)


def least_probable_span_mask(scores: jax.Array, k: jax.Array, span_len: int) -> jax.Array:
    """`stride1` re-masking (docs/design.md §6.9): the union of the least probable overlapping spans, about `k` tokens.

    Span j covers tokens j .. j+L-1 and scores the sum of their token scores. The number u of top spans is found by
    the reference's binary search (lo = k // L, hi = k - L + 1, mid rounded half to even) and the union of the last
    mid evaluated is returned.

    Args:
      scores: `[T]` per-token scores (-log prob, `FROZEN_SCORE` for tokens that must stay).
      k: target number of masked tokens (traced ok); raised to at least L.
    Returns:
      `[T]` bool, True = re-mask.
    """
    length = scores.shape[-1]
    n_spans = length - span_len + 1
    windows = jnp.stack([scores[j : j + n_spans] for j in range(span_len)], axis=-1)
    rank = rank_from_order(jnp.argsort(_sum_left_to_right(windows), descending=True, stable=True))
    # A token is in the union of the top-u spans iff the best-ranked span covering it has rank < u.
    pad = jnp.full((span_len - 1,), n_spans, rank.dtype)
    padded = jnp.concatenate([pad, rank, pad])
    best_rank = jnp.min(jnp.stack([padded[j : j + length] for j in range(span_len)]), axis=0)

    k = jnp.maximum(k, span_len)
    lo, hi = k // span_len, k - span_len + 1
    mid = _round_half_even_mean(lo, hi)

    def searching(carry):
        lo, hi, mid, _ = carry
        return (lo < mid) & (mid < hi)

    def bisect(carry):
        lo, hi, mid, _ = carry
        too_many = jnp.sum(best_rank < mid) > k
        lo, hi = jnp.where(too_many, lo, mid), jnp.where(too_many, mid, hi)
        return lo, hi, _round_half_even_mean(lo, hi), mid

    # If the first mid is already lo or hi, no search runs and that mid is used.
    _, _, _, spans = jax.lax.while_loop(searching, bisect, (lo, hi, mid, mid))
    return best_rank < spans
