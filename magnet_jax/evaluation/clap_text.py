"""The text tower of LAION-CLAP (`tmodel="roberta"`) in Flax Linen, and its tokenizer.

laion_clap (clap_module/model.py, `CLAP.encode_text` for "roberta") runs transformers' `RobertaModel` (roberta-base)
on `input_ids` and `attention_mask` and takes its `pooler_output` (tanh of a dense layer on the first token's last
hidden state, not the bare CLS state), then `text_projection` (Linear 768 -> 512, ReLU, Linear 512 -> 512);
`get_text_embedding` L2-normalises the result. The tokenizer is `RobertaTokenizer` of roberta-base called with
`padding="max_length", truncation=True, max_length=77` (hook.py, and audiocraft's clap_consistency.py).

RoBERTa: post-LayerNorm BERT layers (GELU with erf), LayerNorm eps 1e-5, position ids counted over non-pad tokens
from `pad_token_id + 1` (pads get position `pad_token_id`), one token type.

Param tree (names follow the torch state dict, `a.N` -> `a_N`; see `clap.torch_key`): `text_branch/{embeddings/
{word_embeddings, position_embeddings, token_type_embeddings}/embedding, embeddings/LayerNorm, encoder/layer_{i}/
{attention/self/{query,key,value}, attention/output/{dense,LayerNorm}, intermediate/dense, output/{dense,LayerNorm}},
pooler/dense}`, `text_projection_0`, `text_projection_2`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.fileio import WeightsError, resolve_file

CONTEXT_LENGTH = 77  # laion_clap's tokenizer call: padding to / truncation at 77 tokens
TOKENIZER_HUB_ID = "roberta-base"


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    """transformers' roberta-base `config.json` (the defaults) or a smaller one of the same architecture."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    """torch's LayerNorm: two-pass variance (flax's default E[x^2] - E[x]^2 loses digits on offset inputs)."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class _SelfAttention(nn.Module):
    """query / key / value projections `[B, L, hidden] -> 3 x [B, L, H, head_dim]`."""

    config: RobertaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return tuple(
            nn.Dense(c.hidden_size, name=n)(x).reshape(*x.shape[:2], c.num_heads, -1) for n in ("query", "key", "value")
        )


class _DenseNorm(nn.Module):
    """`LayerNorm(dense(h) + residual)`: the `output` blocks of a BERT layer."""

    config: RobertaConfig

    @nn.compact
    def __call__(self, h, residual):
        h = nn.Dense(self.config.hidden_size, name="dense")(h)
        return layer_norm(self.config.layer_norm_eps, "LayerNorm")(h + residual)


class _Attention(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, x, bias):
        q, k, v = _SelfAttention(self.config, name="self")(x)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5 + bias
        h = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(x.shape)
        return _DenseNorm(self.config, name="output")(h, x)


class _Intermediate(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, x):
        return nn.gelu(nn.Dense(self.config.intermediate_size, name="dense")(x), approximate=False)


class _Layer(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, x, bias):
        x = _Attention(self.config, name="attention")(x, bias)
        return _DenseNorm(self.config, name="output")(_Intermediate(self.config, name="intermediate")(x), x)


class _Encoder(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, x, bias):
        for i in range(self.config.num_layers):
            x = _Layer(self.config, name=f"layer_{i}")(x, bias)
        return x


class _Pooler(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, first):
        return jnp.tanh(nn.Dense(self.config.hidden_size, name="dense")(first))


class _Embeddings(nn.Module):
    config: RobertaConfig

    @nn.compact
    def __call__(self, ids):
        c = self.config
        not_pad = (ids != c.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(not_pad, axis=1) * not_pad + c.pad_token_id
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
            + nn.Embed(c.max_positions, c.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(jnp.zeros_like(ids))
        )
        return layer_norm(c.layer_norm_eps, "LayerNorm")(x)


class RobertaPooled(nn.Module):
    """`(ids [B, L] int32, mask [B, L]) -> pooler_output [B, hidden]` of transformers' `RobertaModel` (eval)."""

    config: RobertaConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        x = _Embeddings(self.config, name="embeddings")(ids)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [B, 1, 1, L]
        x = _Encoder(self.config, name="encoder")(x, bias)
        return _Pooler(self.config, name="pooler")(x[:, 0])


def project(x: jax.Array, features: int, prefix: str) -> jax.Array:
    """laion_clap's `audio_projection` / `text_projection` (Linear, ReLU, Linear: Sequential indices 0 and 2), as
    submodules `{prefix}_0`, `{prefix}_2` of the calling compact module."""
    x = nn.relu(nn.Dense(features, name=f"{prefix}_0")(x))
    return nn.Dense(features, name=f"{prefix}_2")(x)


def l2_normalize(x: jax.Array) -> jax.Array:
    """torch `F.normalize(x, dim=-1)`: x / max(||x||, 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class ClapText(nn.Module):
    """`(ids [B, L], mask [B, L]) -> [B, joint]`: L2-normalised CLAP text embeddings (`CLAP.get_text_embedding`)."""

    config: RobertaConfig
    joint_dim: int = 512

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        pooled = RobertaPooled(self.config, name="text_branch")(ids, mask)
        return l2_normalize(project(pooled, self.joint_dim, "text_projection"))


def load_clap_tokenizer(source: str | os.PathLike = TOKENIZER_HUB_ID):
    """roberta-base's byte-level BPE tokenizer (`RobertaTokenizer`) from a directory holding `vocab.json` and
    `merges.txt`, or a hub id (roberta-base, where the hub is reachable); one-line `WeightsError` otherwise."""
    from transformers import RobertaTokenizer

    what = f"CLAP text tokenizer {source}"
    vocab = resolve_file(source, "vocab.json", what=what)
    merges = resolve_file(source, "merges.txt", what=what)
    try:
        return RobertaTokenizer(vocab=str(vocab), merges=str(merges))
    except Exception as e:  # malformed json / merges: tokenizers raises assorted exception types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{what}: cannot build a RobertaTokenizer from {vocab} and {merges} ({reason})") from e


def tokenize(tokenizer, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """`texts` -> (input_ids, attention_mask) `[B, 77]` int32, as laion_clap and audiocraft call the tokenizer."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of strings")
    batch = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=CONTEXT_LENGTH, return_tensors="np"
    )
    return jnp.asarray(batch["input_ids"], jnp.int32), jnp.asarray(batch["attention_mask"], jnp.int32)
