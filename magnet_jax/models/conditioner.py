"""Text conditioning (magnet-spec §2.5, §2.6): tokenizer, frozen T5, projection, CFG and word dropout.

Three uses: inside the jitted train step (`encode_text`, `cfg_dropout`, `cross_attend` on batches tokenized by the
input pipeline), in generation (`TextConditioner`, once per batch), and offline (`TextConditioner.precompute`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.models.attention import torch_linear_uniform
from magnet_jax.models.t5 import T5Config, T5Encoder, load_t5


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
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("cond_embed", "embed")),
                            (states.shape[-1], self.dim), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(init, ("embed",)), (self.dim,), self.param_dtype)
        out = (states.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype))
        out = out * mask[..., None].astype(self.dtype)
        return nn.with_logical_constraint(out, ("batch", "cond_length", "act_embed"))


# ---- tokenizer (host side) -------------------------------------------------------------------------------

class TextTokenizer:
    """T5 tokenization as the reference's T5Conditioner: EOS appended, padded to the longest description.

    `None` or "" is the null condition: tokenized as "" (just EOS) with its mask row zeroed. Descriptions longer than
    `max_length` tokens keep their first `max_length - 1` tokens and the EOS (the reference never truncates; raise
    `max_length` to match it on long texts). Word dropout (training) drops each space-separated word with
    probability `word_dropout`, before the null check, so a fully dropped description becomes null as in the
    reference. Picklable (grain workers reload the tokenizer from `source`).
    """

    def __init__(self, source: str, *, max_length: int = 256, word_dropout: float = 0.0):
        self.source, self.max_length, self.word_dropout = str(source), int(max_length), float(word_dropout)
        self._tokenizer = self._load()

    def _load(self):
        from transformers import T5Tokenizer

        from magnet_jax.checkpoints.weights import WeightsError, resolve_file
        resolve_file(self.source, "spiece.model", what=f"T5 tokenizer {self.source!r}")  # clear error first
        try:
            return T5Tokenizer.from_pretrained(self.source)
        except Exception as e:
            raise WeightsError(f"T5 tokenizer {self.source!r}: cannot load ({str(e).splitlines()[0]})") from e

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer = self._load()

    @property
    def pad_id(self) -> int:
        return int(self._tokenizer.pad_token_id)

    def __call__(self, descriptions: Sequence[str | None], *, word_dropout_key: jax.Array | None = None
                 ) -> dict[str, np.ndarray]:
        """-> `{'ids': [B, L] int32, 'mask': [B, L] int32}` NumPy, L = longest tokenized description."""
        entries = ["" if d is None else str(d) for d in descriptions]
        if word_dropout_key is not None and self.word_dropout > 0:
            entries = drop_words(entries, word_dropout_key, self.word_dropout)
        out = self._tokenizer(entries, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="np")
        ids, mask = out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)
        mask[[i for i, e in enumerate(entries) if e == ""]] = 0
        return {"ids": ids, "mask": mask}


def drop_words(entries: Sequence[str], key: jax.Array, p: float) -> list[str]:
    """Drops each space-separated word with probability p (the reference's word dropout), seeded by a JAX key."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return [" ".join(w for w in e.split(" ") if rng.random() >= p) for e in entries]


# ---- jittable pieces ---------------------------------------------------------------------------------------

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
    them all (spec §2.5); our batches may be padded further to a static length, so positions beyond the batch's
    longest (null rows count their EOS) are excluded.
    """
    longest = jnp.max(jnp.sum(ids != pad_id, axis=-1))
    return jnp.broadcast_to(jnp.arange(ids.shape[-1])[None, :] < longest, ids.shape)


# ---- convenience: whole conditioner -----------------------------------------------------------------------

class TextConditioner:
    """Tokenizer + frozen T5 for generation and offline jobs: descriptions -> (states, mask, attend).

    The LM's `project_condition` (trainable `cond_proj`) turns the states into the cross-attention input.
    """

    def __init__(self, source: str, *, max_length: int = 256, dtype: str = "float32"):
        self.tokenizer = TextTokenizer(source, max_length=max_length)
        self.t5_config, self.t5_params = load_t5(source, dtype=dtype)
        self._encode = jax.jit(functools.partial(encode_text, self.t5_config))

    def __call__(self, descriptions: Sequence[str | None], *, pad_to: int | None = None) -> dict[str, jax.Array]:
        """-> `{'states': [B, L, Dt], 'mask': [B, L], 'attend': [B, L] bool}`; `pad_to` pads L to a static length."""
        tokens = self.tokenizer(descriptions)
        ids, mask = tokens["ids"], tokens["mask"]
        if pad_to is not None and pad_to > ids.shape[1]:
            extra = ((0, 0), (0, pad_to - ids.shape[1]))
            ids = np.pad(ids, extra, constant_values=self.tokenizer.pad_id)
            mask = np.pad(mask, extra)
        states = self._encode(self.t5_params, ids, mask)
        return {"states": states, "mask": jnp.asarray(mask), "attend": cross_attend(ids, self.tokenizer.pad_id)}

    def precompute(self, descriptions: Sequence[str | None]) -> list[np.ndarray]:
        """Offline embeddings for a data job (no word dropout): one `[L_i, Dt]` float array per description,
        trimmed to its own tokens (a null description gives a `[0, Dt]` array)."""
        out = self(descriptions)
        states, mask = np.asarray(out["states"]), np.asarray(out["mask"])
        return [s[m > 0] for s, m in zip(states, mask)]
