"""Generation longer than the trained window (docs/design.md §6.13): windows joined by audio-code continuation.

The first window is an ordinary generation of `window` frames. Window j >= 1 covers output frames
[j * stride, j * stride + window): its first `context = window - stride` frames are the previous window's last ones,
given as a frozen prompt (the decoder's continuation path), and its last `stride` frames are new. Every window has
the same shape, so one compiled decoding program serves them all; the last window is generated whole and trimmed.
Row b's window j uses a key derived from row b's own key only, so rows stay independent of their batch mates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from magnet_jax.generation import decoding
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel

WINDOW_STREAM = 0x57494E44  # fold_in tag of window keys ("WIND"), apart from the decoder's stage folds (< K)


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Frames of a windowed generation.

    total: output frames.
    window: frames one window generates, prompt included (the model's trained window).
    stride: new frames of each window after the first (0 < stride < window).
    """

    total: int
    window: int
    stride: int

    def __post_init__(self):
        if not 0 < self.stride < self.window:
            raise ValueError(
                f"extend stride of {self.stride} frames: expected between 1 and {self.window - 1} "
                f"(the window of {self.window} frames minus at least one frame of context)"
            )
        if self.total < 1:
            raise ValueError(f"{self.total} output frames: expected at least one")

    @property
    def context(self) -> int:
        """Frames each window after the first continues from the one before it."""
        return self.window - self.stride

    @property
    def num_windows(self) -> int:
        return 1 if self.total <= self.window else 1 + math.ceil((self.total - self.window) / self.stride)

    def start(self, j: int) -> int:
        """Output frame where window j begins (its prompt included)."""
        return j * self.stride

    def kept(self, j: int) -> int:
        """Frames window j adds to the output: the whole first window, then up to `stride` new frames each."""
        if j == 0:
            return min(self.total, self.window)
        return min(self.stride, self.total - self.window - (j - 1) * self.stride)


@jax.jit
def window_keys(row_keys: jax.Array, j: jax.Array) -> jax.Array:
    """`[B]` keys of window j >= 1 (typed, or raw uint32 `[B, 2]`): `fold_in(fold_in(row key, WINDOW_STREAM), j)`,
    row by row. Window 0 uses the row keys themselves (a single window is an ordinary generation)."""
    return jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, WINDOW_STREAM), j))(row_keys)


def extend(
    first: jax.Array,
    generate_window: Callable[[jax.Array, jax.Array], jax.Array],
    row_keys: jax.Array,
    plan: WindowPlan,
) -> jax.Array:
    """Joins the windows of `plan`.

    Args:
      first: `[B, K, window]` codes of window 0.
      generate_window: `(keys [B], prompt [B, K, context]) -> [B, K, window]` codes whose first `context` frames are
        the prompt (audio-code continuation with the conditioning of window 0).
      row_keys: `[B]` row keys (those of window 0).
      plan: the `WindowPlan`; `first` must hold `plan.window` frames.
    Returns:
      `[B, K, plan.total]` codes (same sharding as the windows').
    """
    if first.shape[-1] != plan.window:
        raise ValueError(f"first window: {first.shape[-1]} frames, expected {plan.window}")
    pieces, last = [first[..., : plan.kept(0)]], first
    for j in range(1, plan.num_windows):
        last = generate_window(window_keys(row_keys, j), _tail(last, plan.context))
        pieces.append(_head(last, plan.context, plan.kept(j)))
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


def continuation(
    model: LanguageModel,
    params,
    cond: TextConditioning,
    decode_params: decoding.DecodeParams,
    *,
    window: int,
    rescorer=None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The `generate_window` of `extend` for MAGNeT: `decoding.generate_codes` of `window` frames continuing the
    prompt, with the conditioning `cond` of the first window (computed once) and the same decoding settings and
    rescorer. Call the result under the logical-axis rules the params were sharded with."""

    def generate_window(keys: jax.Array, prompt: jax.Array) -> jax.Array:
        return decoding.generate_codes(
            model, params, cond, keys, decode_params, length=window, prompt=prompt, rescorer=rescorer
        )

    return generate_window


@functools.partial(jax.jit, static_argnums=1)
def _tail(codes: jax.Array, frames: int) -> jax.Array:
    return codes[..., codes.shape[-1] - frames :]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _head(codes: jax.Array, start: int, frames: int) -> jax.Array:
    return codes[..., start : start + frames]
