"""Rules of the MAGNeT decoder (docs/design.md §6): schedules, sampling rules, one step's masking, whole generation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from configs.magnet import get_config
from magnet_jax.generation.decoding import (
    DecodeParams,
    DecodeState,
    decode_step,
    generate_codes,
    guided_logits_fn,
    initial_scores,
    stage_schedule,
)
from magnet_jax.generation.sampling import (
    FROZEN_SCORE,
    sample_categorical,
    sample_tokens,
    sample_top_p,
    top_k_probs,
    top_p_threshold,
)
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

CONFIG = LMConfig(dim=32, num_heads=4, num_layers=2, card=32, cond_dim=16, n_q=4)
MASK = CONFIG.card
SAMPLING = DecodeParams(decoding_steps=(5, 3, 3, 2))  # music defaults otherwise: top-p 0.9, temperature 3, CFG 10->1


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_steps,n_units,expected",
    [
        (20, 166, [166, 165, 163, 160, 157, 152, 145, 138, 130, 122, 112, 101, 90, 79, 66, 53, 40, 27, 13, 1]),
        (10, 166, [166, 163, 155, 143, 127, 106, 82, 56, 28, 1]),
        (20, 500, [500, 498, 493, 484, 472, 457, 439, 418, 394, 367, 338, 307, 273, 237, 200, 162, 122, 82, 41, 1]),
    ],
)
def test_chunk_counts_match_spec_tables(n_steps, n_units, expected):
    assert stage_schedule(n_steps, n_units, DecodeParams()).num_masked.tolist() == expected


def test_schedule_matches_reference_float32_arithmetic():
    """Every step of every stage length up to 64, against audiocraft's own torch scalar arithmetic: identical unit
    counts and temperatures; CFG coefficients within one float32 ulp (torch's SIMD cosine is not correctly rounded,
    ours is)."""
    torch = pytest.importorskip("torch")
    params = DecodeParams(temperature=3.0, max_cfg=10.0, min_cfg=1.0)
    for n_steps in range(1, 65):
        taus = torch.linspace(0, 1, n_steps)
        for n_units in (1, 2, 7, 16, 166, 333, 498, 500, 1500):
            ours = stage_schedule(n_steps, n_units, params)
            for i, tau in enumerate(taus):
                mask_p = torch.cos(tau * math.pi * 0.5)
                assert ours.num_masked[i] == max(int((mask_p * n_units).item()), 1), (n_steps, n_units, i)
                cfg = float(mask_p) * 10.0 + (1 - float(mask_p)) * 1.0
                np.testing.assert_allclose(ours.cfg_coef[i], cfg, rtol=2.5e-7)
                assert ours.temperature[i] == np.float32(max(3.0 * ((n_steps - 1 - i) / n_steps), 1e-2))


def test_cfg_and_temperature_schedules():
    s = stage_schedule(20, 166, DecodeParams(temperature=3.0, max_cfg=10.0, min_cfg=1.0))
    assert s.cfg_coef[0] == 10.0  # everything masked: full guidance
    assert abs(s.cfg_coef[-1] - 1.0) < 1e-6  # ~nothing masked: no guidance
    assert np.all(np.diff(s.cfg_coef) < 0)
    np.testing.assert_allclose(s.temperature[:-1], 3.0 * np.arange(19, 0, -1) / 20, rtol=1e-6)  # 2.85 ... 0.15
    assert s.temperature[-1] == np.float32(0.01)  # 0 -> clamped
    constant = stage_schedule(10, 166, DecodeParams(temperature=2.0, anneal_temp=False))
    assert np.all(constant.temperature == 2.0)
    assert np.all(stage_schedule(4, 10, DecodeParams(temperature=0.0)).temperature == np.float32(0.01))
    sound = stage_schedule(10, 166, DecodeParams(max_cfg=20.0, min_cfg=1.0))
    assert sound.cfg_coef[0] == 20.0 and np.all(sound.num_masked == stage_schedule(10, 166, DecodeParams()).num_masked)


def test_decode_params_from_config():
    music = DecodeParams.from_config(get_config("duration=10").generate)
    assert music == DecodeParams()  # the reference's public API defaults
    long = DecodeParams.from_config(get_config("duration=30").generate, span_len=3)
    assert long.decoding_steps == (60, 10, 10, 10)
    sound = DecodeParams.from_config(get_config("task=sound").generate, span_arrangement="stride1")
    assert (sound.temperature, sound.top_p, sound.max_cfg, sound.span_arrangement) == (3.5, 0.8, 20.0, "stride1")
    with pytest.raises(ValueError, match="unknown field.*cfg_coef"):
        DecodeParams.from_config({"cfg_coef": 3.0})
    for bad, match in [
        ({"span_arrangement": "stride2"}, "span_arrangement"),
        ({"span_scoring": "min"}, "span_scoring"),
        ({"decoding_steps": [20, 0, 10, 10]}, "decoding_steps"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"span_len": 0}, "span_len"),
    ]:
        with pytest.raises(ValueError, match=match):
            DecodeParams(**bad)


# ----------------------------------------------------------------------------------------------------------------
# Sampling rules
# ----------------------------------------------------------------------------------------------------------------


def _numpy_nucleus(probs, p):
    """docs/design.md §6.7: sorted descending, token j dropped when cumsum_j - p_j > p."""
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    keep = np.cumsum(sorted_p) - sorted_p <= p
    return set(order[keep].tolist())


_sample_top_p_many = jax.jit(jax.vmap(sample_top_p, in_axes=(0, None, None)), static_argnums=2)


@pytest.mark.parametrize(
    "probs,p",
    [
        ([0.05, 0.5, 0.3, 0.1, 0.05], 0.9),  # 0.5+0.3 = 0.8 <= 0.9: the 0.1 token is kept, the 0.05s dropped
        ([0.05, 0.5, 0.3, 0.1, 0.05], 0.75),  # 0.8 > 0.75: only 0.5 and 0.3
        ([0.02, 0.95, 0.01, 0.02], 0.9),  # the most probable token alone already exceeds p: kept alone
        ([0.25, 0.25, 0.25, 0.25], 1.0),  # p = 1 keeps everything
    ],
)
def test_nucleus_sampling_follows_reference_rule(probs, p):
    probs = np.asarray(probs, np.float32)
    kept = _numpy_nucleus(probs, p)
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(_sample_top_p_many(keys, jnp.asarray(probs), p))
    assert set(np.unique(draws).tolist()) == kept
    expected = np.zeros_like(probs)
    expected[list(kept)] = probs[list(kept)] / probs[list(kept)].sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=len(probs)) / len(draws), expected, atol=0.03)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_top_p_threshold_keeps_the_reference_nucleus(p):
    """The kept set equals the sorted rule's on 300 random distributions (rows whose boundary mass is within
    float rounding of p are skipped)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 64)) * rng.uniform(0.3, 4.0, size=(300, 1))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    kept = np.asarray(probs >= np.asarray(top_p_threshold(jnp.asarray(probs, jnp.float32), p)))
    checked = 0
    for row, ours in zip(probs, kept):
        before = np.sort(row)[::-1].cumsum() - np.sort(row)[::-1]
        if np.min(np.abs(before - p)) < 1e-5:
            continue
        assert set(np.flatnonzero(ours)) == _numpy_nucleus(row, p)
        checked += 1
    assert checked > 280


def test_sample_categorical_frequencies():
    weights = jnp.asarray([0.0, 2.0, 1.0, 0.0, 5.0, 2.0])
    draws = np.asarray(
        jax.jit(jax.vmap(sample_categorical, in_axes=(0, None)))(jax.random.split(jax.random.key(3), 6000), weights)
    )
    np.testing.assert_allclose(np.bincount(draws, minlength=6) / 6000, weights / weights.sum(), atol=0.02)
    assert not np.any(np.isin(draws, [0, 3]))  # zero weights are never drawn


def test_top_k_probs_keep_ties_and_renormalise():
    probs = jnp.asarray([[0.1, 0.3, 0.2, 0.2, 0.15, 0.05]])
    np.testing.assert_allclose(
        np.asarray(top_k_probs(probs, 2))[0], [0, 0.3, 0.2, 0.2, 0, 0] / np.float32(0.7), rtol=1e-6
    )  # the 2nd largest is tied: both kept
    np.testing.assert_allclose(np.asarray(top_k_probs(probs, 1))[0], [0, 1, 0, 0, 0, 0])


def test_sample_tokens_modes():
    logits = jax.random.normal(jax.random.key(1), (6, 16)) * 3
    temperature = jnp.float32(0.7)
    tempered = jax.nn.softmax(logits / temperature)
    sample_tokens_jit = jax.jit(sample_tokens, static_argnames=("use_sampling", "top_p", "top_k"))
    greedy, q = sample_tokens_jit(jax.random.key(2), logits, temperature, use_sampling=False, top_p=0.9, top_k=0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_allclose(q, jnp.max(tempered, -1), rtol=1e-6)  # confidence from the tempered softmax
    tokens, q = sample_tokens_jit(jax.random.key(2), logits, temperature, use_sampling=True, top_p=0.0, top_k=3)
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(t in row for t, row in zip(np.asarray(tokens), top3))
    # top-k confidences come from the truncated, renormalised distribution (as the reference's in-place filter)
    truncated = top_k_probs(tempered, 3)
    np.testing.assert_allclose(q, jnp.take_along_axis(truncated, tokens[:, None], -1)[:, 0], rtol=1e-6)
    tokens, q = sample_tokens_jit(jax.random.key(2), logits, temperature, use_sampling=True, top_p=0.9, top_k=0)
    np.testing.assert_allclose(q, jnp.take_along_axis(tempered, tokens[:, None], -1)[:, 0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# One decoding step on a real (tiny, random) LM
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    model = LanguageModel(CONFIG)
    params = jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))(jax.random.key(0))
    return model, params


def _conditioning(batch, key=3, length=5):
    states = jax.random.normal(jax.random.key(key), (batch, length, CONFIG.cond_dim))
    return TextConditioning(states, jnp.ones((batch, length), jnp.int32), None)


@pytest.mark.parametrize("arrangement", ["nonoverlap", "stride1"])
def test_decode_step_remasks_least_confident_and_changes_only_masked_positions(lm, arrangement):
    model, params = lm
    dp = DecodeParams(span_arrangement=arrangement, use_sampling=True)
    batch, length, stage, prompt_len = 2, 24, 1, 4
    rng = np.random.default_rng(0)
    codes = rng.integers(0, CONFIG.card, (batch, CONFIG.n_q, length))
    codes[:, 2:] = MASK  # later codebooks not decoded yet
    prompt_row = np.full((batch, length), MASK)
    prompt_row[:, :prompt_len] = codes[:, stage, :prompt_len]
    # Units sampled at the previous step carry scores; the others are frozen (the prompt's whole units too).
    if arrangement == "nonoverlap":
        frozen = np.isin(np.arange(8), [0, 2, 5])  # 8 chunks; chunk 0 = prompt frames 0-2
        k = 3
    else:
        frozen = (np.arange(length) < 10) | ((np.arange(length) >= 16) & (np.arange(length) < 20))
        k = 6
    scores = np.where(frozen, FROZEN_SCORE, rng.uniform(0, 1, (batch, frozen.size))).astype(np.float32)

    @jax.jit
    def step(codes, scores):
        guided = guided_logits_fn(model, params, _conditioning(batch))
        return decode_step(
            guided,
            dp,
            DecodeState(codes, scores),
            stage=jnp.int32(stage),
            step=jnp.int32(1),
            num_masked=jnp.int32(k),
            cfg_coef=jnp.float32(3.0),
            temperature=jnp.float32(1.0),
            prompt_row=jnp.asarray(prompt_row),
            prompt_len=jnp.int32(prompt_len),
            row_keys=jax.random.split(jax.random.key(5), batch),
            mask_id=MASK,
        )

    out = step(jnp.asarray(codes, jnp.int32), jnp.asarray(scores))
    new_codes, new_scores = np.asarray(out.codes), np.asarray(out.scores)
    np.testing.assert_array_equal(np.delete(new_codes, stage, axis=1), np.delete(codes, stage, axis=1))
    assert np.all(new_codes[:, stage] < CONFIG.card)  # every re-masked position was filled
    np.testing.assert_array_equal(new_codes[:, stage, :prompt_len], codes[:, stage, :prompt_len])
    for b in range(batch):
        if arrangement == "nonoverlap":
            chosen = np.zeros(8, bool)
            chosen[np.argsort(-scores[b])[:k]] = True  # the k least confident chunks
            np.testing.assert_array_equal(new_scores[b] != FROZEN_SCORE, chosen)  # all others frozen now
            remasked = np.repeat(chosen, 3)
        else:
            remasked = new_scores[b] != FROZEN_SCORE
            assert remasked.sum() >= 3 and not np.any(remasked & frozen)  # whole spans of sampled tokens only
            runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], remasked.astype(int), [0]]))))[::2]
            assert np.all(runs >= 3)
        # Frozen positions are untouched; re-masked ones are resampled.
        np.testing.assert_array_equal(new_codes[b, stage, ~remasked], codes[b, stage, ~remasked])
        changed = remasked & (np.arange(length) >= prompt_len)
        assert np.any(new_codes[b, stage, changed] != codes[b, stage, changed])


def test_initial_scores_freeze_whole_prompt_units():
    chunked = np.asarray(initial_scores(DecodeParams(), 1, 12, jnp.int32(7)))[0]
    np.testing.assert_array_equal(chunked, [FROZEN_SCORE, FROZEN_SCORE, 0, 0])  # 7 frames = 2 whole chunks
    tokens = np.asarray(initial_scores(DecodeParams(span_arrangement="stride1"), 1, 12, jnp.int32(7)))[0]
    np.testing.assert_array_equal(tokens == FROZEN_SCORE, np.arange(12) < 7)


# ----------------------------------------------------------------------------------------------------------------
# Whole generation
# ----------------------------------------------------------------------------------------------------------------


def test_generation_shapes_prompt_and_seeds(lm):
    model, params = lm
    cond = _conditioning(2)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.card, (2, CONFIG.n_q, 7)), jnp.int32)
    codes = np.asarray(generate_codes(model, params, cond, jax.random.key(0), SAMPLING, length=50, prompt=prompt))
    assert codes.shape == (2, CONFIG.n_q, 48)  # trimmed to whole chunks
    assert codes.min() >= 0 and codes.max() < CONFIG.card  # nothing left masked
    np.testing.assert_array_equal(codes[..., :7], prompt)  # prompt kept in every codebook
    assert len(np.unique(codes[..., 7:])) > 10

    again = generate_codes(model, params, cond, jax.random.key(0), SAMPLING, length=50, prompt=prompt)
    np.testing.assert_array_equal(codes, again)
    other = np.asarray(generate_codes(model, params, cond, jax.random.key(1), SAMPLING, length=50, prompt=prompt))
    assert np.mean(other[..., 7:] != codes[..., 7:]) > 0.5

    # Per-row keys: a row depends on its own key and inputs only, not on the other rows of the batch.
    keys = jax.random.split(jax.random.key(7), 3)
    first = generate_codes(model, params, cond, keys[:2], SAMPLING, length=50)
    mixed_cond = TextConditioning(jnp.stack([cond.states[0], _conditioning(1, key=9).states[0]]), cond.mask)
    second = generate_codes(model, params, mixed_cond, keys[jnp.asarray([0, 2])], SAMPLING, length=50)
    np.testing.assert_array_equal(first[0], second[0])
    assert np.any(np.asarray(first[1]) != np.asarray(second[1]))


def test_stages_never_rewrite_earlier_codebooks(lm):
    """Codebook 0 is final after stage 0: fewer steps for the later stages leave it identical."""
    model, params = lm
    cond = _conditioning(2)
    stride1 = DecodeParams(decoding_steps=(5, 3, 3, 2), span_arrangement="stride1")
    full = np.asarray(generate_codes(model, params, cond, jax.random.key(0), stride1, length=40))
    short = DecodeParams(decoding_steps=(5, 1, 2, 1), span_arrangement="stride1")
    fewer = np.asarray(generate_codes(model, params, cond, jax.random.key(0), short, length=40))
    assert full.shape == (2, CONFIG.n_q, 40)  # stride1 keeps the length
    np.testing.assert_array_equal(full[:, 0], fewer[:, 0])
    assert np.any(full[:, 1:] != fewer[:, 1:])


def test_sharded_batch_stays_sharded_and_matches_single_device(lm):
    model, params = lm
    greedy = DecodeParams(decoding_steps=(3, 2, 2, 2), use_sampling=False)
    cond = _conditioning(8)
    expected = np.asarray(generate_codes(model, params, cond, jax.random.key(0), greedy, length=30))

    mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rules = tuple((name, tuple(a) if isinstance(a, list) else a) for name, a in get_config().sharding_rules)
    abstract = jax.eval_shape(lambda k: init_params(model, k), jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    # Params sharded by the logical rules (fsdp), inputs over the batch; the program follows the inputs' shardings.
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, shardings)
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        sharded_cond = jax.device_put(cond, batch)
        codes = generate_codes(model, sharded_params, sharded_cond, jax.random.key(0), greedy, length=30)
    assert codes.sharding.shard_shape(codes.shape)[0] <= 2  # the batch stays split over (at least) the data axis
    np.testing.assert_array_equal(np.asarray(codes), expected)


def test_bad_inputs_raise_clear_errors(lm):
    model, params = lm
    cond = _conditioning(2)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="decoding_steps=.*expected 4 entries"):
        generate_codes(model, params, cond, key, DecodeParams(decoding_steps=(20, 10)), length=30)
    with pytest.raises(ValueError, match="prompt: 30 frames, expected fewer than the 30"):
        generate_codes(model, params, cond, key, SAMPLING, length=31, prompt=jnp.zeros((2, 4, 30), jnp.int32))
    with pytest.raises(ValueError, match=r"prompt: shape \(1, 4, 5\), expected \[2, 4, Tp\]"):
        generate_codes(model, params, cond, key, SAMPLING, length=30, prompt=jnp.zeros((1, 4, 5), jnp.int32))
    with pytest.raises(ValueError, match="length=2: expected at least span_len=3 frames"):
        generate_codes(model, params, cond, key, SAMPLING, length=2)
    with pytest.raises(ValueError, match="3 row keys for a batch of 2"):
        generate_codes(model, params, cond, jax.random.split(key, 3), SAMPLING, length=30)
    with pytest.raises(ValueError, match="non-causal"):
        causal = LanguageModel(LMConfig(**{**CONFIG.to_dict(), "causal": True}))
        generate_codes(causal, params, cond, key, SAMPLING, length=30)
