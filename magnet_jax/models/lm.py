"""The MAGNeT / MusicGen language model over K parallel codebook streams (docs/design.md §2).

One Linen module serves both: `causal=False` is MAGNeT (full attention at stage 0, the ±`subcodes_context` band at
stages >= 1, the stage being a traced value), `causal=True` is MusicGen; Hybrid-MAGNeT is a non-causal model run
with an explicit `self_mask` in training and with the causal key/value cache for its autoregressive prefix.
Parameter tree (D = dim, F = 4D, N layers, H heads, Dh = D / H, Dt = text-encoder dim):

  emb_{k}/embedding            [card + 1, D]      k = 0..K-1, row `card` is the mask/special id
  cond_proj/{kernel, bias}     [Dt, D], [D]       T5 -> LM projection (`output_proj` of the reference)
  blocks/...                   every leaf with a leading [N] axis when `scan_layers`, else block_{i}/...
      norm1, norm_cross, norm2/{scale, bias}      [D]
      self_attn, cross_attn/{query, key, value}/kernel [D, H, Dh];  .../out/kernel [H, Dh, D]
      linear1/kernel [D, F];  linear2/kernel [F, D]
  out_norm/{scale, bias}       [D]
  head_{k}/kernel              [D, card]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.attention import (
    MultiHeadAttention,
    StageMask,
    cached_causal_mask,
    dot_general_f32_accumulation,
    resolve_implementation,
    stage_attention_mask,
    truncated_normal,
)
from magnet_jax.models.conditioner import ConditionProjection


@dataclasses.dataclass(frozen=True)
class LMConfig:
    dim: int
    num_heads: int
    num_layers: int
    hidden_scale: int = 4
    n_q: int = 4
    card: int = 2048
    cond_dim: int = 768
    causal: bool = False
    subcodes_context: int = 5
    norm_eps: float = 1e-5
    max_period: float = 10000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True
    attention: str = "auto"  # attention kernel: "auto" (by platform), "xla", "cudnn", "splash" (`attention.attend`)

    @property
    def ffn_dim(self) -> int:
        return self.hidden_scale * self.dim

    @property
    def mask_id(self) -> int:
        """The mask / special token id (= card)."""
        return self.card

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> LMConfig:
        """Builds from the `model` section of `configs/magnet.py` (unknown keys are an error)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(model_cfg)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}")
        config = cls(**values)
        resolve_implementation(config.attention, config.dtype)  # validates
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# LMConfig fields that are run-time choices (compute/storage dtype, remat, layer layout, attention kernel), not
# architecture.
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention")


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], *, architecture_only: bool = False
) -> list[tuple[str, Any, Any]]:
    """`(field, saved value, current value)` for every field of two `model` config sections that differs (only the
    architecture fields when `architecture_only`: params of one fit a model of the other)."""
    fields = sorted(set(saved) | set(current))
    if architecture_only:
        fields = [f for f in fields if f not in RUNTIME_FIELDS]
    return [(f, saved.get(f), current.get(f)) for f in fields if saved.get(f) != current.get(f)]


def sinusoidal_embedding(positions: jax.Array, dim: int, max_period: float, dtype) -> jax.Array:
    """audiocraft's sin embedding: `[..., D]` = concat(cos(p / P^(j/(D/2-1))), sin(...)), cos first."""
    half = dim // 2
    freqs = jnp.arange(half, dtype=jnp.float32) / (half - 1)
    phase = positions[..., None].astype(jnp.float32) / (max_period**freqs)
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1).astype(dtype)


class Block(nn.Module):
    """Pre-LN transformer layer: self-attention, cross-attention to the condition, GELU feed-forward."""

    config: LMConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def norm():
            return nn.LayerNorm(
                epsilon=c.norm_eps,
                dtype=dtype,
                param_dtype=pdtype,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            )

        def dense(features, axes, fan_in):
            return nn.Dense(
                features,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                kernel_init=nn.with_logical_partitioning(truncated_normal(fan_in**-0.5), axes),
                dot_general=dot_general_f32_accumulation,
            )

        self.norm1, self.norm_cross, self.norm2 = norm(), norm(), norm()
        self.self_attn = MultiHeadAttention(c.dim, c.num_heads, dtype, pdtype, c.attention)
        self.cross_attn = MultiHeadAttention(c.dim, c.num_heads, dtype, pdtype, c.attention)
        self.linear1 = dense(c.ffn_dim, ("embed", "mlp"), c.dim)
        self.linear2 = dense(c.dim, ("mlp", "embed"), c.ffn_dim)

    def __call__(self, x, condition, cross_kv, self_mask, cross_mask, cache, cache_index):
        """One layer. `x [B, T, D]`; `condition [B, L, D]` or None when `cross_kv` (this layer's k, v) is given.

        With `cache` (this layer's self-attention keys/values) `x` holds positions `cache_index ...` and the updated
        cache is returned as the second output (None otherwise).
        """
        if cache is None:
            x = x + self.self_attn(self.norm1(x), mask=self_mask)
        else:
            attn, cache = self.self_attn.cached_self_attention(self.norm1(x), cache, cache_index, mask=self_mask)
            x = x + attn
        x = x + self._cross_attention(self.norm_cross(x), condition, cross_kv, cross_mask)
        h = nn.with_logical_constraint(self.linear1(self.norm2(x)), ("batch", "length", "act_mlp"))
        x = x + self.linear2(nn.gelu(h, approximate=False))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), cache

    def _cross_attention(self, h, condition, cross_kv, cross_mask):
        """Cross-attention of `h [R, T, D]`. When the conditioning holds R / 2 rows, the rows of `h` are (conditioned,
        null) pairs: row 2b attends condition b, and row 2b + 1, whose null condition has zero keys and values (the
        projection zeroes it, the attention has no biases), gets exactly zero, so it is not computed."""
        cond_rows = (cross_kv[0] if cross_kv is not None else condition).shape[0]
        if cond_rows == h.shape[0]:
            return self.cross_attn(h, condition, mask=cross_mask, key_value=cross_kv)
        rows, length, dim = h.shape
        if 2 * cond_rows != rows:
            raise ValueError(f"conditioning has {cond_rows} rows for {rows} code rows: expected {rows} or {rows // 2}")
        out = self.cross_attn(
            h.reshape(cond_rows, 2, length, dim)[:, 0], condition, mask=cross_mask, key_value=cross_kv
        )
        return jnp.stack([out, jnp.zeros_like(out)], axis=1).reshape(rows, length, dim)

    def cross_key_value(self, carry, condition, *unused):
        """This layer's cross-attention keys/values of `condition` (scan-compatible signature)."""
        del unused
        return carry, self.cross_attn.key_value(condition)


class LanguageModel(nn.Module):
    """MAGNeT (non-causal) / MusicGen (causal) transformer over `[B, K, T]` codes."""

    config: LMConfig

    def setup(self):
        c = self.config
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.emb = [
            nn.Embed(
                c.card + 1,
                c.dim,
                dtype=dtype,
                param_dtype=pdtype,
                name=f"emb_{k}",
                embedding_init=nn.with_logical_partitioning(truncated_normal(c.dim**-0.5), ("vocab", "embed")),
            )
            for k in range(c.n_q)
        ]
        self.cond_proj = ConditionProjection(c.dim, dtype=dtype, param_dtype=pdtype)
        block = nn.remat(Block) if c.remat else Block
        if c.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
                methods=["__call__", "cross_key_value"],
            )
            self.blocks = scanned(c)
        else:
            self.blocks = [block(c, name=f"block_{i}") for i in range(c.num_layers)]
        self.out_norm = nn.LayerNorm(
            epsilon=c.norm_eps,
            dtype=dtype,
            param_dtype=pdtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        )
        self.heads = [
            nn.Dense(
                c.card,
                use_bias=False,
                dtype=dtype,
                param_dtype=pdtype,
                name=f"head_{k}",
                dot_general=functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32),
                kernel_init=nn.with_logical_partitioning(truncated_normal(c.dim**-0.5), ("embed", "vocab")),
            )
            for k in range(c.n_q)
        ]

    def project_condition(self, cond_states: jax.Array, cond_mask: jax.Array) -> jax.Array:
        """T5 states `[B, L, Dt]` -> conditioning `[B, L, D]`, zero where `cond_mask` is 0 (docs/design.md §3)."""
        return self.cond_proj(cond_states, cond_mask)

    def cross_key_values(self, condition: jax.Array):
        """Per-layer cross-attention (k, v) of `condition [B, L, D]`: stacked `[N, B, H, L, Dh]` or a list.

        Computed once per batch in generation and passed to `__call__(cross_kv=...)`.
        """
        if self.config.scan_layers:
            return self.blocks.cross_key_value(None, condition, None, None, None, None, None)[1]
        return [blk.cross_key_value(None, condition)[1] for blk in self.blocks]

    def __call__(
        self,
        codes: jax.Array,
        condition: jax.Array | None,
        cond_attend: jax.Array | None = None,
        stage: jax.Array | int = 0,
        *,
        cross_kv=None,
        cache: dict | None = None,
        self_mask: jax.Array | None = None,
        head: jax.Array | int | None = None,
        guidance: jax.Array | float | None = None,
    ):
        """Logits for every codebook.

        Args:
          codes: `[B, K, T]` int32 in [0, card]; `card` is the mask id.
          condition: `[B, L, D]` projected conditioning (`project_condition`), or None with `cross_kv`. With B / 2
            rows (and `cross_kv`, `cond_attend` likewise), `codes` are classifier-free-guidance pairs: row 2b with
            condition b, row 2b + 1 with the null condition, whose cross-attention (exactly zero) is skipped.
          cond_attend: `[B, L]` bool, condition positions cross-attention may use (the reference attends padded zero
            vectors up to the batch's longest description; positions beyond are False). None = all.
          stage: codebook stage (traced ok): 0 = full attention, >= 1 = restricted band (MAGNeT only).
          cross_kv: precomputed `cross_key_values(condition)`.
          cache: `init_cache(...)` state; `codes` are then the steps `cache['index'] ...`, attending causally (also
            for a non-causal model: the autoregressive prefix of Hybrid-MAGNeT).
          self_mask: `[B or 1, 1, T, T]` bool self-attention mask (True = attend) replacing the stage / causal mask
            (Hybrid-MAGNeT, `attention.hybrid_attention_mask`); not with `cache`.
          head: only this codebook's head (traced ok; MAGNeT decoding needs one head per pass).
          guidance: classifier-free guidance coefficient (traced ok) for (conditioned, null) row pairs: returns the
            B / 2 guided logits `guide(pairs of logits)`, computed as the head of the guided final states (the heads
            are linear without bias), so the head runs on half the rows.
        Returns:
          `[B, K, T, card]` float32 logits (`[B, T, card]` with `head`; B / 2 rows with `guidance`), and the updated
          cache when `cache` is given.
        """
        c = self.config
        _, n_q, length = codes.shape
        x = sum(self.emb[k](codes[:, k]) for k in range(n_q))
        if cache is None:
            positions, layer_cache, index = jnp.arange(length), None, None
            if self_mask is None and c.causal:
                self_mask = stage_attention_mask(length, stage, subcodes_context=c.subcodes_context, causal=True)
            elif self_mask is None:  # symbolic: the band stages skip the blocks outside the band
                self_mask = StageMask(jnp.asarray(stage, jnp.int32), c.subcodes_context)
        else:
            if self_mask is not None:
                raise ValueError("self_mask and a key/value cache are exclusive (the cache path is causal)")
            index, layer_cache = cache["index"], {"key": cache["key"], "value": cache["value"]}
            positions = index + jnp.arange(length)
            self_mask = cached_causal_mask(length, cache["key"].shape[-2], index)
        x = x + sinusoidal_embedding(positions, c.dim, c.max_period, x.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        cross_mask = None if cond_attend is None else cond_attend[:, None, None, :]
        if c.scan_layers:
            x, new_cache = self.blocks(x, condition, cross_kv, self_mask, cross_mask, layer_cache, index)
        else:
            new_cache = []
            for i, blk in enumerate(self.blocks):
                x, layer = blk(
                    x,
                    condition,
                    None if cross_kv is None else cross_kv[i],
                    self_mask,
                    cross_mask,
                    None if cache is None else jax.tree.map(lambda a: a[i], layer_cache),
                    index,
                )
                new_cache.append(layer)
            if cache is not None:
                new_cache = jax.tree.map(lambda *a: jnp.stack(a), *new_cache)
        x = self.out_norm(x)
        if guidance is not None:
            x = guide(x.reshape(-1, 2, *x.shape[1:]).astype(jnp.float32), guidance).astype(x.dtype)
        # Logits accumulate and come out in float32 whatever the compute dtype.
        if head is None:
            logits = jnp.stack([h(x) for h in self.heads], axis=1)
            logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", None, "length", "act_vocab"))
        else:  # the selected kernel only: K times fewer head FLOPs
            kernel = jax.lax.dynamic_index_in_dim(
                jnp.stack([h.variables["params"]["kernel"] for h in self.heads]), head, keepdims=False
            )
            logits = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
            logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        if cache is None:
            return logits
        return logits, {**new_cache, "index": index + length}


def guide(pairs: jax.Array, coef: jax.Array | float) -> jax.Array:
    """Classifier-free guidance of `[B, 2, ...]` (conditioned, null) pairs: `null + (conditioned - null) * coef`,
    `[B, ...]`."""
    conditioned, null = pairs[:, 0], pairs[:, 1]
    return null + (conditioned - null) * coef


def cast_params(params, dtype):
    """`params` with every floating-point leaf in `dtype` (done once before generation, so that no layer casts its
    weights on every pass)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def init_cache(config: LMConfig, batch: int, max_length: int) -> dict:
    """Empty self-attention key/value cache `{'key', 'value': [N, B, H, S_max, Dh], 'index': 0}` (causal decoding)."""
    shape = (config.num_layers, batch, config.num_heads, max_length, config.dim // config.num_heads)
    zeros = jnp.zeros(shape, jnp.dtype(config.dtype))
    return {"key": zeros, "value": zeros, "index": jnp.zeros((), jnp.int32)}


def depthwise_rescale(params: Mapping, config: LMConfig) -> dict:
    """The reference's 'current' depthwise init: layer l (1-based) out/linear1/linear2 std divided by sqrt(2 l).

    Applied once after `model.init` (works on boxed or plain trees, scanned or per-layer layout).
    """
    scale = 1.0 / jnp.sqrt(2.0 * jnp.arange(1, config.num_layers + 1, dtype=jnp.float32))

    def rescale(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        if not {"linear1", "linear2", "out"} & set(names):
            return leaf
        if config.scan_layers:
            factor = scale.reshape((-1,) + (1,) * (_value(leaf).ndim - 1))
        else:
            layer = next(int(n.split("_")[1]) for n in names if isinstance(n, str) and n.startswith("block_"))
            factor = scale[layer]
        return _replace(leaf, _value(leaf) * factor.astype(_value(leaf).dtype))

    return jax.tree_util.tree_map_with_path(rescale, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _value(leaf):
    return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _replace(leaf, value):
    return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value


def init_params(model: LanguageModel, key: jax.Array, *, length: int = 8, cond_length: int = 4) -> dict:
    """Fresh parameters initialised as the reference (docs/design.md §2.4), boxed with logical axis names."""
    c = model.config
    codes = jnp.zeros((1, c.n_q, length), jnp.int32)
    states = jnp.zeros((1, cond_length, c.cond_dim), jnp.float32)
    mask = jnp.ones((1, cond_length), jnp.int32)

    def run(m, codes, states, mask):
        return m(codes, m.project_condition(states, mask))

    variables = model.init(key, codes, states, mask, method=run)
    return depthwise_rescale(variables["params"], c)


def count_params(config: LMConfig) -> int:
    """Number of trainable LM parameters (incl. the condition projection), from `jax.eval_shape`."""
    shapes = jax.eval_shape(lambda k: init_params(LanguageModel(config), k), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
