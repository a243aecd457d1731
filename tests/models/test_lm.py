"""Behaviour of the LM module: MAGNeT attention modes, causality, layouts, remat, cross K/V, bf16, sizes."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.magnet import get_config
from magnet_jax.checkpoints.lm_weights import audiocraft_shapes, set_layer_layout
from magnet_jax.models.lm import LanguageModel, LMConfig, cast_params, count_params, init_params

LENGTH, COND_LEN, CARD = 32, 5, 16


def tiny(**overrides) -> LMConfig:
    return LMConfig(**{**dict(dim=32, num_heads=4, num_layers=2, n_q=4, card=CARD, cond_dim=24), **overrides})


@functools.cache
def setup(config: LMConfig):
    """(model, params, condition, jitted logits(params, codes, stage)) for a random model and condition."""
    model = LanguageModel(config)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))(jax.random.key(0))
    states = jax.random.normal(jax.random.key(1), (2, COND_LEN, config.cond_dim))
    mask = jnp.array([[1] * COND_LEN, [1, 1, 0, 0, 0]])
    condition = model.apply({"params": params}, states, mask, method=model.project_condition)

    @jax.jit
    def logits(params, codes, stage):
        return model.apply({"params": params}, codes, condition, None, stage)

    return model, params, condition, logits


def random_codes(config: LMConfig, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.card + 1, (2, config.n_q, LENGTH)).astype(np.int32)


def changed_positions(config: LMConfig, stage: int, edit) -> np.ndarray:
    """Time positions whose logits change when `edit(codes)` modifies the input tokens."""
    _, params, _, logits = setup(config)
    codes = random_codes(config)
    edited = codes.copy()
    edit(edited)
    assert (edited != codes).any()
    diff = np.abs(np.asarray(logits(params, codes, stage)) - np.asarray(logits(params, edited, stage)))
    return np.nonzero(diff.max(axis=(0, 1, 3)) > 0)[0]


def _replace(codes, positions):
    codes[:, :, positions] = (codes[:, :, positions] + 1) % (CARD + 1)


def test_stage0_output_depends_on_tokens_anywhere():
    config = tiny(num_layers=1)
    assert set(changed_positions(config, 0, lambda c: _replace(c, [LENGTH - 1]))) == set(range(LENGTH))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_band_stage_output_ignores_tokens_beyond_context(stage):
    """One layer: position i sees exactly i-5 .. i+5 (a change outside never reaches it, one inside always does)."""
    config = tiny(num_layers=1)
    i = 15
    outside = [t for t in range(LENGTH) if abs(t - i) > config.subcodes_context]
    assert i not in changed_positions(config, stage, lambda c: _replace(c, outside))
    for t in (i - 5, i + 5):
        assert i in changed_positions(config, stage, lambda c, t=t: _replace(c, [t]))


def test_band_receptive_field_grows_by_context_per_layer():
    """The band mask is applied in every layer, so N layers reach N * 5 frames (here 2 layers: 10)."""
    config = tiny(num_layers=2)
    changed = changed_positions(config, 1, lambda c: _replace(c, [16]))
    assert set(changed) == set(range(6, 27))


def test_causal_output_ignores_future_tokens():
    config = tiny(causal=True)
    i = 12
    changed = changed_positions(config, 0, lambda c: _replace(c, list(range(i + 1, LENGTH))))
    assert changed.min() == i + 1
    assert set(changed_positions(config, 2, lambda c: _replace(c, [i]))) == set(range(i, LENGTH))


def apply(config: LMConfig, params, codes, condition, stage, **kwargs):
    """Jitted forward of a model built from `config`."""
    model = LanguageModel(config)
    return jax.jit(lambda p, c, cond: model.apply({"params": p}, c, cond, None, stage, **kwargs))(
        params, codes, condition
    )


def test_scanned_and_per_layer_layouts_give_identical_logits():
    config = tiny()
    _, params, condition, logits = setup(config)
    codes = random_codes(config)
    per_layer = set_layer_layout(params, scan_layers=False)
    assert "block_1" in per_layer and "blocks" not in per_layer
    unscanned = apply(tiny(scan_layers=False), per_layer, codes, condition, 1)
    np.testing.assert_allclose(np.asarray(unscanned), np.asarray(logits(params, codes, 1)), rtol=1e-6, atol=1e-6)
    restacked = set_layer_layout(per_layer, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, restacked, jax.tree.map(np.asarray, params))


def test_remat_gives_identical_logits_and_gradients():
    config = tiny()
    _, params, condition, _ = setup(config)
    codes = random_codes(config)

    @functools.partial(jax.jit, static_argnums=1)
    @functools.partial(jax.value_and_grad, has_aux=True)
    def loss(params, remat):
        logits = LanguageModel(tiny(remat=remat)).apply({"params": params}, codes, condition, None, 0)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (_, logits), grads = loss(params, False)
    (_, logits_remat), grads_remat = loss(params, True)
    np.testing.assert_allclose(np.asarray(logits_remat), np.asarray(logits), rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_remat, grads)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_precomputed_cross_kv_equals_condition_path(scan_layers):
    config = tiny()
    model, params, condition, logits = setup(config)
    if not scan_layers:
        config, params = tiny(scan_layers=False), set_layer_layout(params, scan_layers=False)
        model = LanguageModel(config)
    codes = random_codes(config)
    cross_kv = jax.jit(lambda p: model.apply({"params": p}, condition, method=model.cross_key_values))(params)
    cached = apply(config, params, codes, None, 2, cross_kv=cross_kv)
    direct = logits(setup(tiny())[1], codes, 2)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(direct), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_guidance_pairs_with_half_the_conditioning_equal_zero_null_conditions(scan_layers):
    """B-row conditioning for 2B code rows: rows 2b + 1 are the null condition (cross-attention skipped), the same
    logits as the 2B-row batch whose odd rows have an all-masked (zero) description."""
    config = tiny(scan_layers=scan_layers)
    model = LanguageModel(config)
    params = setup(tiny())[1] if scan_layers else set_layer_layout(setup(tiny())[1], scan_layers=False)
    states = jax.random.normal(jax.random.key(1), (2, COND_LEN, config.cond_dim))
    mask = jnp.array([[1] * COND_LEN, [1, 1, 0, 0, 0]])
    attend = jnp.array([[True] * COND_LEN, [True] * 3 + [False] * 2])
    codes = np.repeat(random_codes(config), 2, axis=0)
    codes[1::2, 0] = (codes[1::2, 0] + 1) % (CARD + 1)  # the null rows differ from their pair
    interleave = lambda x, null: jnp.stack([x, null], axis=1).reshape(-1, *x.shape[1:])  # noqa: E731

    def run(states, mask, attend, cross_kv):
        def fn(m):
            condition = m.project_condition(states, mask)
            kv = m.cross_key_values(condition) if cross_kv else None
            return m(codes, None if cross_kv else condition, attend, 1, cross_kv=kv)

        return np.asarray(jax.jit(lambda p: model.apply({"params": p}, method=fn))(params))

    full = run(interleave(states, states), interleave(mask, jnp.zeros_like(mask)), interleave(attend, attend), True)
    for cross_kv in (True, False):
        np.testing.assert_array_equal(run(states, mask, attend, cross_kv), full)
    with pytest.raises(ValueError, match="conditioning has 3 rows for 4 code rows"):
        run(jnp.concatenate([states, states[:1]]), jnp.concatenate([mask, mask[:1]]), None, True)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_guidance_before_the_heads_equals_guiding_the_pairs_logits(scan_layers):
    """`guidance` mixes each (conditioned, null) pair's final states before the heads: the same logits as mixing
    the pair's logits, for every head and for one traced head."""
    config = tiny(scan_layers=scan_layers)
    model = LanguageModel(config)
    params = setup(tiny())[1] if scan_layers else set_layer_layout(setup(tiny())[1], scan_layers=False)
    states = jax.random.normal(jax.random.key(1), (2, COND_LEN, config.cond_dim))
    codes = np.repeat(random_codes(config), 2, axis=0)

    def run(head, guidance):
        def fn(m):
            condition = m.project_condition(states, jnp.ones(states.shape[:2], jnp.int32))
            return m(codes, condition, None, 0, head=head, guidance=guidance)

        return np.asarray(jax.jit(lambda p: model.apply({"params": p}, method=fn))(params))

    pairs = run(None, None)
    pairs = pairs.reshape(-1, 2, *pairs.shape[1:])
    expected = pairs[:, 1] + (pairs[:, 0] - pairs[:, 1]) * 3.0
    guided = run(None, jnp.float32(3.0))
    assert guided.shape == expected.shape
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(run(2, jnp.float32(3.0)), expected[:, 2], rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_single_head_equals_that_codebooks_logits():
    config = tiny()
    model, params, condition, logits = setup(config)
    codes = random_codes(config)
    full = np.asarray(logits(params, codes, 1))
    one_head = jax.jit(lambda p, head: model.apply({"params": p}, codes, condition, None, 1, head=head))
    for head in range(config.n_q):  # one program, the head traced
        np.testing.assert_allclose(np.asarray(one_head(params, head)), full[:, head], rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_runs_close_to_float32():
    _, params, condition, logits = setup(tiny())
    codes = random_codes(tiny())
    low = apply(tiny(dtype="bfloat16"), params, codes, condition.astype(jnp.bfloat16), 1)
    high = logits(params, codes, 1)
    assert low.dtype == jnp.float32 and bool(jnp.isfinite(low).all())
    assert float(jnp.abs(low - high).max()) < 0.05 * float(jnp.abs(high).max())


def test_bfloat16_params_cast_once_keep_float32_logits_and_attention_softmax():
    _, params, condition, logits = setup(tiny())
    codes = random_codes(tiny())
    low_params = cast_params(params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(low_params)} == {jnp.dtype(jnp.bfloat16)}
    config = tiny(dtype="bfloat16", param_dtype="bfloat16")
    for stage in (0, 1):
        low = apply(config, low_params, codes, condition.astype(jnp.bfloat16), stage)
        high = logits(params, codes, stage)
        assert low.dtype == jnp.float32
        assert float(jnp.abs(low - high).max()) < 0.05 * float(jnp.abs(high).max())
        assert float((low.argmax(-1) == high.argmax(-1)).mean()) > 0.9


@pytest.mark.parametrize("size,expected_millions", [("small", 420.4), ("medium", 1838.7)])
def test_parameter_counts_match_released_models(size, expected_millions):
    config = LMConfig.from_config(get_config(f"size={size}").model)
    count = count_params(config)
    assert round(count / 1e6, 1) == expected_millions
    assert count == sum(math.prod(s) for s in audiocraft_shapes(config).values())  # the released key table
