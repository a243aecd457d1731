"""Text conditioning inside the jitted steps (docs/design.md §3): frozen T5 states, the projection into the LM,
CFG dropout, and the cross-attention positions. Tokenization is host-side (`magnet_jax.data.tokenizer`).
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.attention import torch_linear_uniform
from magnet_jax.models.t5 import T5Config, T5Encoder


class ConditionProjection(nn.Module):
    """`output_proj` of the reference: Linear(Dt -> D) with bias, then zeroed where the text mask is 0.

    `__call__(states [B, L, Dt], mask [B, L]) -> [B, L, D]`. Padded and null (empty description) positions become
    exact zero vectors.
    """

    dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, states: jax.Array, mask: jax.Array) -> jax.Array:
        init = torch_linear_uniform(states.shape[-1])  # PyTorch default Linear init, weight and bias
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, ("cond_embed", "embed")),
            (states.shape[-1], self.dim),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(init, ("embed",)), (self.dim,), self.param_dtype)
        out = states.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)
        out = out * mask[..., None].astype(self.dtype)
        return nn.with_logical_constraint(out, ("batch", "cond_length", "act_embed"))


def encode_text(t5_config: T5Config, t5_params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Frozen T5: `ids, mask [B, L]` -> last hidden state `[B, L, Dt]` (no gradient flows into T5)."""
    states = T5Encoder(t5_config).apply({"params": jax.lax.stop_gradient(t5_params)}, ids, mask)
    return jax.lax.stop_gradient(states)


def cfg_dropout(key: jax.Array, mask: jax.Array, p: float) -> jax.Array:
    """Classifier-free-guidance dropout: one Bernoulli(p) per batch; if it fires every row becomes null."""
    keep = jax.random.uniform(key) >= p
    return mask * keep.astype(mask.dtype)


def cross_attend(ids: jax.Array, pad_id: int = 0) -> jax.Array:
    """`[B, L]` bool: condition positions the LM's cross-attention uses.

    The reference pads every row with zero vectors up to the longest tokenized description of the batch and attends
    them all (docs/design.md §3); our batches may be padded further to a static length, so positions beyond the batch's
    longest (null rows count their EOS) are excluded.
    """
    longest = jnp.max(jnp.sum(ids != pad_id, axis=-1))
    return jnp.broadcast_to(jnp.arange(ids.shape[-1])[None, :] < longest, ids.shape)


@flax.struct.dataclass
class TextConditioning:
    """Text conditioning of the B rows to generate (the null-condition twins are built inside).

    states: `[B, L, Dt]` text-encoder (T5) states.
    mask:   `[B, L]` text mask (0 at padding and for null descriptions); the projection zeroes those positions.
    attend: `[B, L]` bool, condition positions cross-attention attends (the reference attends every position up
      to the batch's longest description, padded zeros included); None = all L positions.
    """

    states: jax.Array
    mask: jax.Array
    attend: jax.Array | None = None


def row_conditioning(t5_config: T5Config, pad_id: int, t5_params, ids: jax.Array, mask: jax.Array) -> TextConditioning:
    """Conditioning of rows generated (or scored) independently: frozen-T5 states of `ids, mask [B, L]`, each row
    attending its own tokens (`cross_attend` of a batch of one, row by row)."""
    states = encode_text(t5_config, t5_params, ids, mask)
    attend = jax.vmap(lambda row: cross_attend(row[None], pad_id)[0])(ids)
    return TextConditioning(states=states, mask=mask, attend=attend)
