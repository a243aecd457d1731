"""Attention kernels: head-major dense attention (and its query blocks), the band computation of stages >= 1 and
the Pallas splash kernel (interpret mode on CPU) against `jax.nn.dot_product_attention` with the dense stage mask;
kernel selection by platform."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.models.attention import (
    StageMask,
    attend,
    band_attention,
    dense_attention,
    query_blocked_attention,
    resolve_implementation,
    stage_attention_mask,
)
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params


def qkv(batch, heads, length, dh, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((batch, heads, length, dh)), jnp.float32) for _ in range(3)]


def library_attention(q, k, v, mask):
    """`jax.nn.dot_product_attention` (the layout `[B, T, H, Dh]` it takes) on head-major inputs."""
    out = jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), mask=mask)
    return jnp.swapaxes(out, 1, 2)


@pytest.mark.parametrize("length,width,block", [(50, 2, 8), (50, 5, 8), (7, 3, 4), (64, 0, 16)])
def test_band_blocks_equal_dense_band_mask(length, width, block):
    q, k, v = qkv(2, 3, length, 8)
    mask = stage_attention_mask(length, 1, subcodes_context=width, causal=False)
    band = jax.jit(band_attention, static_argnums=(3, 4))(q, k, v, width, block)
    np.testing.assert_allclose(np.asarray(band), np.asarray(library_attention(q, k, v, mask)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("length,block", [(300, 128), (250, 125), (7, 4)])
def test_query_blocks_give_the_dense_values(length, block):
    """Blocks of equal size (300 -> 3 x 100, 250 -> 2 x 125, padded: 7 -> 2 x 4), each row computed as in the dense
    pass (to float32 rounding: the matmul kernels of other shapes may sum in another order)."""
    q, k, v = qkv(2, 3, length, 8, seed=5)
    blocked = jax.jit(query_blocked_attention, static_argnums=3)(q, k, v, block)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense_attention(q, k, v, None)), rtol=0, atol=1e-6)


def test_dense_attention_equals_library_with_a_key_mask():
    q, k, v = qkv(2, 2, 9, 8)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 1, 1, 9)) > 0.4).at[:, :, :, 0].set(True)
    ours = dense_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(library_attention(q, k, v, mask)), rtol=0, atol=1e-6)


def test_stage_mask_is_one_program_with_band_at_stages_above_zero():
    length = 150  # long enough for the blocked band path
    q, k, v = qkv(1, 2, length, 16)
    fn = jax.jit(lambda q, k, v, stage: attend(q, k, v, StageMask(stage, 5)))
    for stage in (0, 1, 3):
        mask = stage_attention_mask(length, stage, subcodes_context=5, causal=False)
        ours = fn(q, k, v, jnp.int32(stage))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(library_attention(q, k, v, mask)), atol=2e-6)
    assert fn._cache_size() == 1


TINY_LM = LMConfig(dim=32, num_heads=4, num_layers=2, n_q=2, card=16, cond_dim=8)


@pytest.fixture(scope="module")
def tiny_lm_params():
    return jax.jit(lambda key: nn.meta.unbox(init_params(LanguageModel(TINY_LM), key)))(jax.random.key(0))


def test_lm_band_stage_logits_equal_explicit_dense_mask(tiny_lm_params):
    """The LM's symbolic stage mask (blocked band) gives the logits of the same mask passed densely."""
    model, params = LanguageModel(TINY_LM), tiny_lm_params
    length = 100
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 17, (2, 2, length)), jnp.int32)
    condition = model.apply({"params": params}, jnp.ones((2, 3, 8)), jnp.ones((2, 3)), method=model.project_condition)
    run = jax.jit(lambda stage, mask: model.apply({"params": params}, codes, condition, None, stage, self_mask=mask))
    for stage in (0, 1):
        dense = stage_attention_mask(length, stage, subcodes_context=TINY_LM.subcodes_context, causal=False)
        np.testing.assert_allclose(np.asarray(run(stage, None)), np.asarray(run(stage, dense)), rtol=1e-6, atol=1e-6)


def test_auto_kernel_is_splash_on_tpu_and_cudnn_only_on_gpu_with_16_bit_compute():
    assert resolve_implementation("auto", jnp.float32, "cpu") == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, "tpu") == "splash"
    assert resolve_implementation("auto", jnp.float32, "tpu") == "splash"
    assert resolve_implementation("auto", jnp.float32, "gpu") == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert resolve_implementation("xla", jnp.bfloat16, "gpu") == "xla"
    with pytest.raises(ValueError, match="attention='flash': expected one of"):
        LMConfig.from_config({"dim": 32, "num_heads": 4, "num_layers": 1, "attention": "flash"})


@pytest.mark.parametrize("length,width", [(130, 2), (128, -1)])
def test_splash_kernel_equals_dense_stage_mask_in_one_program(length, width):
    """Lengths off and on the 128-row blocks (padding), a band and the unrestricted mask (width < 0)."""
    q, k, v = qkv(2, 2, length, 16, seed=3)
    fn = jax.jit(lambda q, k, v, stage: attend(q, k, v, StageMask(stage, width), "splash"))
    for stage in (0, 1, 2):
        mask = stage_attention_mask(length, stage, subcodes_context=width, causal=False)
        ours = fn(q, k, v, jnp.int32(stage))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(library_attention(q, k, v, mask)), rtol=0, atol=2e-6)
    assert fn._cache_size() == 1


def test_lm_splash_logits_equal_xla_at_full_and_band_stages(tiny_lm_params):
    """The whole LM (self-attention by splash, cross-attention with its key mask by XLA) against the XLA kernels."""
    length = 40
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 17, (2, 2, length)), jnp.int32)
    attend_cond = jnp.asarray([[True, True, False], [True, False, False]])
    logits = {}
    for kernel in ("xla", "splash"):
        model = LanguageModel(dataclasses.replace(TINY_LM, attention=kernel))
        params = tiny_lm_params
        condition = model.apply(
            {"params": params}, jnp.ones((2, 3, 8)), jnp.ones((2, 3)), method=model.project_condition
        )
        run = jax.jit(lambda stage: model.apply({"params": params}, codes, condition, attend_cond, stage))
        logits[kernel] = [np.asarray(run(jnp.int32(stage))) for stage in (0, 1)]
    for xla, splash in zip(logits["xla"], logits["splash"]):
        np.testing.assert_allclose(splash, xla, rtol=1e-5, atol=1e-5)


def test_splash_gradients_equal_dense_stage_mask():
    """Training through the kernel (its backward blocks): q/k/v gradients at the full and a band stage."""
    q, k, v = qkv(1, 2, 130, 16, seed=4)

    def loss(q, k, v, stage, kernel):
        mask = StageMask(stage, 2) if kernel else stage_attention_mask(130, stage, subcodes_context=2, causal=False)
        return jnp.sum(jnp.sin(attend(q, k, v, mask, "splash") if kernel else library_attention(q, k, v, mask)))

    grad = jax.jit(jax.grad(lambda q, k, v, stage: loss(q, k, v, stage, True), argnums=(0, 1, 2)))
    for stage in (0, 1):
        reference = jax.grad(lambda q, k, v: loss(q, k, v, stage, False), argnums=(0, 1, 2))(q, k, v)
        for ours, expected in zip(grad(q, k, v, jnp.int32(stage)), reference):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), rtol=0, atol=2e-6)
