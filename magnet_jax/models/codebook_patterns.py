"""MusicGen's delay codebook pattern: K parallel streams laid out so step s holds frame s - 1 - q of codebook q
(docs/design.md §8).

Layout of `[B, K, T]` codes: `[B, K, S]`, S = T + K; step 0 is all special tokens, step s holds frame t = s - 1 - q
of codebook q when 0 <= t < T and the special id (= card) otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delay_valid(n_q: int, num_steps: int) -> jax.Array:
    """`[K, S]` bool: step s of codebook q holds a real frame (0 <= s - 1 - q < S - K)."""
    frame = jnp.arange(num_steps)[None, :] - 1 - jnp.arange(n_q)[:, None]
    return (frame >= 0) & (frame < num_steps - n_q)


def apply_delay_pattern(codes: jax.Array, special: int) -> jax.Array:
    """`[B, K, T]` codes -> `[B, K, T + K]` delay layout (step 0 all `special`)."""
    _, n_q, length = codes.shape
    frame = jnp.arange(length + n_q)[None, :] - 1 - jnp.arange(n_q)[:, None]  # [K, S]
    gathered = jnp.take_along_axis(codes, jnp.clip(frame, 0, length - 1)[None], axis=2)
    return jnp.where(delay_valid(n_q, length + n_q)[None], gathered, special)


def revert_delay_pattern(sequence: jax.Array) -> jax.Array:
    """Inverse of `apply_delay_pattern`: `[B, K, T + K]` -> `[B, K, T]`."""
    _, n_q, steps = sequence.shape
    length = steps - n_q
    index = jnp.arange(length)[None, :] + 1 + jnp.arange(n_q)[:, None]  # [K, T]
    return jnp.take_along_axis(sequence, index[None], axis=2)


def frame_logits(logits: jax.Array, length: int) -> jax.Array:
    """Delay-layout logits `[B, K, T + K, V]` -> frame-aligned `[B, K, T, V]`: row t + q of head q predicts frame t
    of codebook q."""
    return jnp.stack([logits[:, q, q : q + length] for q in range(logits.shape[1])], axis=1)


def forced_layout(prompt: jax.Array, length: int, special: int) -> jax.Array:
    """Prompt codes `[B, K, Tp]` (Tp <= length) -> the delay layout `[B, K, length + K]` of the tokens to force,
    `special` where generation is free."""
    batch, n_q, _ = prompt.shape
    padded = jnp.full((batch, n_q, length), special, jnp.int32).at[:, :, : prompt.shape[2]].set(prompt)
    return apply_delay_pattern(padded, special)
