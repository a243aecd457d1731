"""The T5 text encoder in Flax Linen: the frozen conditioning model (docs/design.md §3).

Covers the original T5 (ReLU feed-forward: t5-base, t5-large) and T5 v1.1 / flan (gated-GELU). Weights are read by
`magnet_jax.checkpoints.t5_weights`.

Param tree: `embedding [vocab, d]`, `relpos_bias [buckets, H]` (first layer's, shared by all), `block_{i}/
{attn_norm/scale, {query,key,value}/kernel [d, H, dkv], out/kernel [H, dkv, d], ffn_norm/scale,
wi/kernel | wi_0/kernel + wi_1/kernel [d, d_ff], wo/kernel [d_ff, d]}`, `final_norm/scale`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax import sharding
from magnet_jax.models.attention import Projection


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu" (t5-base/large) or "gated-gelu" (v1.1 / flan)
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")


def relative_position_bucket(relative: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """Bidirectional T5 buckets of `key - query` offsets: half per sign, exact below num_buckets/4, log above."""
    half = num_buckets // 2
    bucket = (relative > 0).astype(jnp.int32) * half
    distance = jnp.abs(relative)
    exact = half // 2
    log_bucket = exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact) * (half - exact)
    ).astype(jnp.int32)
    log_bucket = jnp.minimum(log_bucket, half - 1)
    return bucket + jnp.where(distance < exact, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMS norm with a scale and no bias, computed in float32."""

    epsilon: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (x32 * scale).astype(self.dtype)


class T5Block(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        init = nn.initializers.normal(c.d_model**-0.5)

        def dense(features, axes, name, in_ndim=1):
            features = features if isinstance(features, tuple) else (features,)
            return Projection(features, in_ndim, axes, init, dtype, name=name)

        h = T5LayerNorm(c.layer_norm_epsilon, dtype, name="attn_norm")(x)
        heads = ("embed", "heads", "kv")
        q = dense((c.num_heads, c.d_kv), heads, "query")(h)
        k = dense((c.num_heads, c.d_kv), heads, "key")(h)
        v = dense((c.num_heads, c.d_kv), heads, "value")(h)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias  # no 1/sqrt(d) in T5
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + dense(c.d_model, ("heads", "kv", "embed"), "out", in_ndim=2)(attn)
        h = T5LayerNorm(c.layer_norm_epsilon, dtype, name="ffn_norm")(x)
        if c.gated:
            h = nn.gelu(dense(c.d_ff, ("embed", "mlp"), "wi_0")(h), approximate=True) * dense(
                c.d_ff, ("embed", "mlp"), "wi_1"
            )(h)
        else:
            h = nn.relu(dense(c.d_ff, ("embed", "mlp"), "wi")(h))
        return x + dense(c.d_model, ("mlp", "embed"), "wo")(h)


class T5Encoder(nn.Module):
    """`__call__(ids [B, L] int32, mask [B, L]) -> last hidden state [B, L, d_model]` (transformers T5EncoderModel)."""

    config: T5Config

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = nn.Embed(
            c.vocab_size,
            c.d_model,
            dtype=dtype,
            name="embedding",
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        )(ids)
        length = ids.shape[1]
        buckets = relative_position_bucket(
            jnp.arange(length)[None, :] - jnp.arange(length)[:, None],
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        )
        table = self.param(
            "relpos_bias",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", "heads")),
            (c.relative_attention_num_buckets, c.num_heads),
        )
        bias = jnp.transpose(table[buckets], (2, 0, 1))[None].astype(jnp.float32)  # [1, H, Lq, Lk]
        bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c.num_layers):
            x = T5Block(c, name=f"block_{i}")(x, bias)
        return T5LayerNorm(c.layer_norm_epsilon, dtype, name="final_norm")(x)


# ---- weights (transformers format) ------------------------------------------------------------------------


def param_shardings(config: T5Config, mesh, rules) -> Any:
    """Shardings of the frozen encoder's params (from their logical-axis metadata), for `jax.device_put` and jit."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda k: T5Encoder(config).init(k, tokens, tokens)["params"], jax.random.key(0))
    return sharding.logical_shardings(boxed, mesh, rules)
