"""Multi-head attention and the attention masks of MAGNeT / MusicGen (docs/design.md §2.1, §2.2).

Projections have no biases (audiocraft `bias_attn: false`); heads are contiguous `head_dim` blocks of the model
dimension, as in the packed `in_proj_weight` of the reference. The key/value projection is a separate method so that
cross-attention keys/values can be computed once per batch during generation, and an autoregressive decoder can
keep a key/value cache beside it.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.models.splash import splash_self_attention

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


def dot_general_f32_accumulation(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` accumulated in float32 and returned in the inputs' dtype (`dot_general` of `nn.Dense`).

    The same values as a float32 dot rounded once; in bfloat16 XLA's CPU dot with a float32 result runs about twice
    as fast as one with a bfloat16 result (on TPU/GPU it is how the units accumulate anyway). `preferred_element_type`
    is ignored (the result dtype is the inputs')."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


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
        return dot_general_f32_accumulation(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Query rows per block of the band computation (stages >= 1): the keys of a block are its rows +- subcodes_context.
BAND_BLOCK = 32
# Query rows per block of the full attention on CPU (`query_blocked_attention`): 256 while batch x heads x rows
# stays within QUERY_BLOCK_ROWS_TOTAL, else 128 (`query_block`).
QUERY_BLOCK = 128
QUERY_BLOCK_ROWS_TOTAL = 4096


@flax.struct.dataclass
class StageMask:
    """The MAGNeT self-attention mask of a (traced) codebook `stage` (`stage_attention_mask`), kept symbolic so that
    attention can skip the blocks outside the ±`subcodes_context` band at stages >= 1 (`attend`)."""

    stage: jax.Array
    subcodes_context: int = flax.struct.field(pytree_node=False)

    def dense(self, length: int) -> jax.Array:
        """The boolean `[1, 1, T, T]` mask."""
        return stage_attention_mask(length, self.stage, subcodes_context=self.subcodes_context, causal=False)


def resolve_implementation(implementation: str, dtype, platform: str | None = None) -> str:
    """The attention kernel for `implementation` ('auto', 'xla', 'cudnn', 'splash') on `platform` (default: JAX's
    default backend). 'auto' picks Pallas splash attention on a TPU, cuDNN's fused attention on a GPU for a 16-bit
    compute dtype (the only dtypes it takes), XLA everywhere else."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    platform = jax.default_backend() if platform is None else platform
    if platform == "tpu":
        return "splash"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if platform == "gpu" and half else "xla"


def _large_negative(dtype) -> float:
    """The masked-logit value of `jax.nn.dot_product_attention` (so both paths agree, fully masked rows included)."""
    return -0.7 * float(jnp.finfo(dtype).max)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention in head-major layout: `q [B, H, T, Dh]`, `k, v [B, H, S, Dh]`, boolean `mask` broadcastable
    to `[B, H, T, S]` (True = attend) -> `[B, H, T, Dh]` (any leading axes). Scores and softmax in float32; the
    matmuls are batched over the leading axes (B·H), a layout XLA's CPU dot runs without transposing.

    The softmax is normalised after the second matmul: `(exp(s - max) · v) / sum(exp(s - max))` divides `[T, Dh]`
    values instead of the `[T, S]` weights (one pass less over the scores); the weights enter that matmul in the
    compute dtype, accumulated in float32.
    """
    logits = jnp.einsum("...td,...sd->...ts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(q.shape[-1] ** -0.5)
    if mask is not None:
        logits = jnp.where(mask, logits, _large_negative(logits.dtype))
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("...ts,...sd->...td", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(v.dtype)


def band_attention(q: jax.Array, k: jax.Array, v: jax.Array, width: int, block: int = BAND_BLOCK) -> jax.Array:
    """`dense_attention` under the band mask |i - j| <= `width` (self-attention, `q, k, v [B, H, T, Dh]`), computing
    only the band's blocks: query rows in blocks of `block`, each against the `block + 2 width` keys around it.

    Same result as the dense masked computation (the keys outside the band get an exactly zero weight there);
    T·(block + 2 width) scores instead of T².
    """
    block = max(block, 2 * width)
    batch, heads, length, dh = q.shape
    n = -(-length // block)
    pad = n * block - length
    qb = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(batch, heads, n, block, dh)

    def windows(x):  # [B, H, n, block + 2 width, Dh]: keys n·block - width ... (n + 1)·block + width - 1
        xb = jnp.pad(x, ((0, 0), (0, 0), (width, pad + block - width), (0, 0))).reshape(batch, heads, n + 1, block, dh)
        return jnp.concatenate([xb[:, :, :-1], xb[:, :, 1:, : 2 * width]], axis=3)

    rows = np.arange(n)[:, None, None] * block + np.arange(block)[None, :, None]  # query i
    cols = np.arange(n)[:, None, None] * block - width + np.arange(block + 2 * width)[None, None, :]  # key j
    mask = (np.abs(rows - cols) <= width) & (cols >= 0) & (cols < length)  # [n, block, block + 2 width]
    out = dense_attention(qb, windows(k), windows(v), mask)  # [B, H, n, block, Dh]
    return out.reshape(batch, heads, n * block, dh)[:, :, :length]


def query_block(batch: int, heads: int) -> int:
    """Query rows per block for `[batch, heads, T, Dh]` queries: 256 up to `QUERY_BLOCK_ROWS_TOTAL` rows across
    batch and heads (B·H ≤ 16: a CFG pair of 8 heads), else `QUERY_BLOCK` (128)."""
    return 2 * QUERY_BLOCK if batch * heads * 2 * QUERY_BLOCK <= QUERY_BLOCK_ROWS_TOTAL else QUERY_BLOCK


def query_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = QUERY_BLOCK) -> jax.Array:
    """`dense_attention(q, k, v, None)` with the queries `[B, H, T, Dh]` in n = ceil(T / `block`) equal blocks of
    ceil(T / n) rows (block 128: T = 1500 in 12 x 125, T = 498 in 4 x 125), one block after the other (`lax.map`).

    A block's scores `[B, H, rows, S]` (B = 1, H = 8, S = 1500: 6 MB instead of 72 MB) stay in the CPU's cache from
    the first matmul through the softmax to the second; the whole `[T, S]` score matrix goes through memory at each
    of them. Every row is computed as in `dense_attention` (the same values).
    """
    batch, heads, length, dh = q.shape
    n = -(-length // block)
    rows = -(-length // n)
    qb = jnp.pad(q, ((0, 0), (0, 0), (0, n * rows - length), (0, 0))).reshape(batch, heads, n, rows, dh)
    out = jax.lax.map(lambda qi: dense_attention(qi, k, v, None), jnp.moveaxis(qb, 2, 0))  # [n, B, H, rows, Dh]
    return jnp.moveaxis(out, 0, 2).reshape(batch, heads, n * rows, dh)[:, :, :length]


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention (MAGNeT stage 0): `query_blocked_attention` on CPU in blocks of `query_block` rows when
    T exceeds one block, else `dense_attention` (on an accelerator the loop over blocks would only serialise the
    work)."""
    block = query_block(q.shape[0], q.shape[1])
    if jax.default_backend() == "cpu" and q.shape[2] > block:
        return query_blocked_attention(q, k, v, block)
    return dense_attention(q, k, v, None)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str = "xla") -> jax.Array:
    """Attention of head-major `q [B, H, T, Dh]` over `k, v [B, H, S, Dh]` -> `[B, H, T, Dh]`.

    `mask`: None, a boolean array broadcastable to `[B, H, T, S]`, or a `StageMask` (self-attention). With 'xla', a
    `StageMask` runs `full_attention` at stage 0 and `band_attention` at stages >= 1, both branches of one
    `lax.cond` on the traced stage (one program for every stage). 'cudnn': `jax.nn.dot_product_attention`'s cuDNN
    kernel (GPU, 16-bit dtypes) with the dense mask. 'splash': a `StageMask` runs `splash_self_attention` (Pallas,
    TPU; interpret mode elsewhere); other masks (cross-attention, the hybrid mask) take the XLA path.
    """
    if implementation == "cudnn":
        if isinstance(mask, StageMask):
            mask = mask.dense(q.shape[2])
        if mask is not None:  # cuDNN takes a bias over the full [T, S] (a key mask [B, 1, 1, S] included)
            mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[2], k.shape[2]))
        out = jax.nn.dot_product_attention(
            *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), mask=mask, implementation="cudnn"
        )
        return jnp.swapaxes(out, 1, 2)
    if not isinstance(mask, StageMask):
        return dense_attention(q, k, v, mask)
    if implementation == "splash":
        return splash_self_attention(q, k, v, mask.stage, mask.subcodes_context)
    width, length = mask.subcodes_context, q.shape[2]
    if width < 0:
        return full_attention(q, k, v)
    if length <= 2 * max(BAND_BLOCK, 2 * width):  # too short for blocks to save anything
        return dense_attention(q, k, v, mask.dense(length))
    return jax.lax.cond(
        jnp.asarray(mask.stage) > 0,
        lambda q, k, v: band_attention(q, k, v, width),
        full_attention,
        q,
        k,
        v,
    )


class MultiHeadAttention(nn.Module):
    """Bias-free multi-head attention; q from `x`, k/v from `x` (self) or a context sequence (cross).

    Params: `query`/`key`/`value` kernels `[D, H, Dh]`, `out` kernel `[H, Dh, D]` (torch `in_proj_weight` rows
    q/k/v and `out_proj.weight`, transposed). `out` starts as the reference's gaussian init before depth scaling
    (`lm.depthwise_rescale`). Queries, keys and values are computed head-major, `[B, H, T, Dh]` (`attend`).
    """

    dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: str = "auto"

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

    def _heads(self, proj: Projection, x: jax.Array) -> jax.Array:
        """`x [B, T, D]` -> head-major `[B, H, T, Dh]`."""
        return nn.with_logical_constraint(jnp.swapaxes(proj(x), 1, 2), ("batch", "act_heads", "length", "act_kv"))

    def key_value(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[B, H, S, Dh]` of `context [B, S, D]`."""
        return self._heads(self.key, context), self._heads(self.value, context)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask=None,
        key_value: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Attends from `x [B, T, D]`.

        Args:
          context: `[B, S, D]` source of keys/values; None = self-attention over `x`.
          mask: boolean, broadcastable to `[B, H, T, S]` (True where attention is allowed), or a `StageMask`
            (self-attention of a MAGNeT stage).
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

        Their keys/values are written into `cache = {'key', 'value'}: [B, H, S_max, Dh]` and the queries attend the
        cache under `mask [1, 1, t, S_max]`. Returns `(out [B, t, D], new cache)`.
        """
        k_new, v_new = self.key_value(x)
        start = (0, 0, index, 0)
        cache = {
            "key": jax.lax.dynamic_update_slice(cache["key"], k_new.astype(cache["key"].dtype), start),
            "value": jax.lax.dynamic_update_slice(cache["value"], v_new.astype(cache["value"].dtype), start),
        }
        # A few query rows against the cache: memory-bound, a fused kernel gains nothing; always the XLA path.
        return self._attend(x, cache["key"], cache["value"], mask, "xla"), cache

    def _attend(self, x, k, v, mask, implementation=None):
        q = self._heads(self.query, x)
        implementation = implementation or resolve_implementation(self.implementation, q.dtype)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation)
        return self.out(jnp.swapaxes(out, 1, 2))  # [B, T, H, Dh] x [H, Dh, D] -> [B, T, D]
