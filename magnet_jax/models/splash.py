"""MAGNeT's self-attention through the Pallas splash-attention kernel (TPU; docs/design.md §2.6).

Stage 0 attends every key (a full mask), stages >= 1 the band |i - j| <= `subcodes_context` (a local mask, whose
blocks outside the band the kernel skips). The sequence is padded to the kernel's 128-row blocks; segment ids keep
the real rows and the padding apart (a padded row attends padding only, so no row is empty). Off a TPU the kernel
runs in Pallas interpret mode (slow: for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The kernel's query / key blocks are multiples of 128 rows.
SPLASH_ALIGN = 128
# Block rows of the full-mask kernel (the largest of these that divides the padded length); the band uses
# SPLASH_ALIGN, the smallest block, so that few keys outside the band are scored.
FULL_BLOCKS = (512, 256, 128)


def padded_length(length: int) -> int:
    """`length` rounded up to the kernel's block alignment."""
    return -(-length // SPLASH_ALIGN) * SPLASH_ALIGN


def _kernel(heads: int, length: int, window: int | None, interpret: bool):
    """A single-device splash kernel over the padded `length`: every key (`window` None) or |i - j| <= `window`.

    Built at each trace: its block tables become constants of the program being traced (a kernel kept across
    traces would leak them)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if window is None:
        mask = mask_lib.FullMask((length, length))
        block = next(b for b in FULL_BLOCKS if length % b == 0)
    else:
        mask = mask_lib.LocalMask((length, length), (window, window), offset=0)
        block = SPLASH_ALIGN
    return kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask] * heads),
        block_sizes=kernel_lib.BlockSizes(  # forward and backward (training) blocks
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_self_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, stage: jax.Array, width: int, interpret: bool | None = None
) -> jax.Array:
    """Self-attention of head-major `q, k, v [B, H, T, Dh]` under MAGNeT's mask of the (traced) `stage` ->
    `[B, H, T, Dh]`: every key at stage 0 (and at every stage when `width` < 0), the band |i - j| <= `width` at
    stages >= 1; both kernels are branches of one `lax.cond` (one program for all stages).

    The kernel scores `q·k` without a scale, so `q` is scaled by 1/sqrt(Dh) first (exact for a power-of-4 Dh).
    `interpret`: Pallas interpret mode (default: off a TPU).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    batch, heads, length, dh = q.shape
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    padded = padded_length(length)
    is_pad = jnp.asarray(np.arange(padded) >= length, jnp.int32)
    segments = kernel_lib.SegmentIds(q=is_pad, kv=is_pad)

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))

    def run(window):
        kernel = _kernel(heads, padded, window, interpret)
        return lambda q, k, v: jax.vmap(lambda q, k, v: kernel(q, k, v, segments))(q, k, v)

    q, k, v = pad(q * jnp.asarray(dh**-0.5, q.dtype)), pad(k), pad(v)
    if width < 0:
        out = run(None)(q, k, v)
    else:
        out = jax.lax.cond(jnp.asarray(stage) > 0, run(width), run(None), q, k, v)
    return out[:, :, :length]
