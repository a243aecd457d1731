"""Multi-head attention and the attention masks of MAGNeT / MusicGen (docs/design.md §2.1, §2.2).

Projections have no biases (audiocraft `bias_attn: false`); heads are contiguous `head_dim` blocks of the model
dimension, as in the packed `in_proj_weight` of the reference. The key/value projection is a separate method so that
cross-attention keys/values can be computed once per batch during generation, and an autoregressive decoder can
keep a key/value cache beside it.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def torch_linear_uniform(fan_in: int) -> Initializer:
    """PyTorch's default `nn.Linear` weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def truncated_normal(std: float) -> Initializer:
    """torch `trunc_normal_(std=std, a=-3 std, b=3 std)`: a normal of std `std` cut at ±3 std."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -3.0, 3.0, shape, dtype)

    return init


def stage_attention_mask(length: int, stage: jax.Array | int, *, subcodes_context: int, causal: bool) -> jax.Array:
    """Boolean self-attention mask `[1, 1, T, T]` (True = may attend).

    - causal (MusicGen): key j <= query i;
    - MAGNeT stage 0: everything;
    - MAGNeT stage >= 1: the band |i - j| <= subcodes_context (every layer, docs/design.md §2.2). `stage` may be traced,
    so one
      compiled program serves all stages.
    """
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    if causal:
        mask = k <= q
    else:
        band = jnp.abs(q - k) <= subcodes_context
        mask = jnp.where((jnp.asarray(stage) > 0) & (subcodes_context >= 0), band, True)
    return mask[None, None]


def hybrid_attention_mask(
    boundary: jax.Array, stage: jax.Array | int, *, length: int, n_q: int, subcodes_context: int
) -> jax.Array:
    """Hybrid-MAGNeT self-attention mask `[B, 1, S, S]` over the delay layout (S = T + K; True = may attend).

    Layout row r of head q predicts frame r - q of codebook q; column j holds frame j - 1 - q of codebook q.
    - rows r < boundary[b] (the autoregressive prefix): causal, keys j <= r;
    - rows r >= boundary[b]: the MAGNeT mask of `stage` k shifted by the delay: keys j in [1 + k, 1 + k + T) (the
      columns holding codebook k's frames), and for k >= 1 (and subcodes_context >= 0) |j - 1 - r| <=
      subcodes_context; rows without a frame of codebook k (r < k or r >= k + T) attend every key (their outputs
      are never used; this keeps them finite).

    Args:
      boundary: `[B]` int, the first non-prefix layout row b (the prefix of codebook q is its frames t < b - q).
      stage: the codebook k decoded non-autoregressively (traced ok).
    """
    steps = length + n_q
    r = jnp.arange(steps)[:, None]
    j = jnp.arange(steps)[None, :]
    stage = jnp.asarray(stage)
    band = jnp.abs(j - 1 - r) <= subcodes_context
    restricted = (stage > 0) & (subcodes_context >= 0)
    stage_mask = (j >= 1 + stage) & (j < 1 + stage + length) & jnp.where(restricted, band, True)
    stage_mask = stage_mask | (r < stage) | (r >= stage + length)
    mask = jnp.where(r[None] < boundary[:, None, None], (j <= r)[None], stage_mask[None])
    return mask[:, None]


def cached_causal_mask(length: int, max_length: int, index: jax.Array) -> jax.Array:
    """`[1, 1, t, S_max]` mask for queries at positions `index + [0, t)` over a key/value cache of `S_max` slots."""
    q = index + jnp.arange(length)[:, None]
    return (jnp.arange(max_length)[None, :] <= q)[None, None]


class Projection(nn.Module):
    """Bias-free linear map contracting the last `in_ndim` axes of `x` with a kernel `[*in_shape, *features]`.

    Like `nn.DenseGeneral`, but the kernel is created in its final shape, so its logical-axis box stays valid when
    a mesh is active (DenseGeneral initialises a flattened kernel and reshapes it, and flax then applies the 3-axis
    sharding constraint to the 2-D array - also inside `apply`, which re-traces the initializer for shape checks).
    """

    features: tuple[int, ...]
    in_ndim: int
    axes: tuple[str, ...]
    kernel_init: Initializer
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape[x.ndim - self.in_ndim :] + tuple(self.features)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), shape, self.param_dtype
        )
        contract = tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


class MultiHeadAttention(nn.Module):
    """Bias-free multi-head attention; q from `x`, k/v from `x` (self) or a context sequence (cross).

    Params: `query`/`key`/`value` kernels `[D, H, Dh]`, `out` kernel `[H, Dh, D]` (torch `in_proj_weight` rows
    q/k/v and `out_proj.weight`, transposed). `out` starts as the reference's gaussian init before depth scaling
    (`lm.depthwise_rescale`).
    """

    dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        head_dim = self.dim // self.num_heads

        def dense(features, axes, init, in_ndim=1):
            features = features if isinstance(features, tuple) else (features,)
            return Projection(features, in_ndim, axes, init, self.dtype, self.param_dtype)

        # The packed in_proj_weight is not an nn.Linear in audiocraft, so it keeps PyTorch's default init.
        in_init = torch_linear_uniform(self.dim)
        self.query = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), in_init)
        self.key = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), in_init)
        self.value = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), in_init)
        self.out = dense(self.dim, ("heads", "kv", "embed"), truncated_normal(self.dim**-0.5), in_ndim=2)

    def key_value(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[B, S, H, Dh]` of `context [B, S, D]`."""
        axes = ("batch", "length", "act_heads", "act_kv")
        return (
            nn.with_logical_constraint(self.key(context), axes),
            nn.with_logical_constraint(self.value(context), axes),
        )

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        key_value: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Attends from `x [B, T, D]`.

        Args:
          context: `[B, S, D]` source of keys/values; None = self-attention over `x`.
          mask: boolean, broadcastable to `[B, H, T, S]`; True where attention is allowed.
          key_value: precomputed `(k, v)` from `key_value(context)`; `context` is then unused.
        Returns:
          `[B, T, D]`.
        """
        k, v = key_value if key_value is not None else self.key_value(x if context is None else context)
        return self._attend(x, k, v, mask)

    def cached_self_attention(
        self, x: jax.Array, cache: dict, index: jax.Array, *, mask: jax.Array
    ) -> tuple[jax.Array, dict]:
        """Self-attention for incremental decoding: `x [B, t, D]` are positions `index .. index + t - 1`.

        Their keys/values are written into `cache = {'key', 'value'}: [B, S_max, H, Dh]` and the queries attend the
        cache under `mask [1, 1, t, S_max]`. Returns `(out [B, t, D], new cache)`.
        """
        k_new, v_new = self.key_value(x)
        start = (0, index, 0, 0)
        cache = {
            "key": jax.lax.dynamic_update_slice(cache["key"], k_new.astype(cache["key"].dtype), start),
            "value": jax.lax.dynamic_update_slice(cache["value"], v_new.astype(cache["value"].dtype), start),
        }
        return self._attend(x, cache["key"], cache["value"], mask), cache

    def _attend(self, x, k, v, mask):
        q = nn.with_logical_constraint(self.query(x), ("batch", "length", "act_heads", "act_kv"))
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
        return self.out(out)
