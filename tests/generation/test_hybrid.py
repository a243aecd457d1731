"""Hybrid-MAGNeT: the delay-layout attention mask, the objective's inputs and loss positions, the prefix's causality,
the sharded train / eval steps with objective=hybrid, and single-model hybrid generation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.magnet import get_config
from magnet_jax import sharding
from magnet_jax.checkpoints import t5_weights
from magnet_jax.data.tokenizer import TextTokenizer
from magnet_jax.generation import hybrid, musicgen
from magnet_jax.generation.decoding import DecodeParams
from magnet_jax.models import codebook_patterns, objectives, t5
from magnet_jax.models.attention import hybrid_attention_mask
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params
from magnet_jax.training import masking, train_lib

T, K, CARD, CTX = 12, 4, 32, 2


def _numpy_mask(boundary, stage, length, n_q, ctx):
    """The hybrid mask written out row by row from its definition."""
    steps = length + n_q
    out = np.zeros((len(boundary), 1, steps, steps), bool)
    for b, bound in enumerate(boundary):
        for r in range(steps):
            for j in range(steps):
                if r < bound:
                    out[b, 0, r, j] = j <= r
                elif r < stage or r >= stage + length:
                    out[b, 0, r, j] = True
                else:
                    in_codebook = 1 + stage <= j < 1 + stage + length
                    out[b, 0, r, j] = in_codebook and (stage == 0 or ctx < 0 or abs(j - 1 - r) <= ctx)
    return out


@pytest.mark.parametrize("ctx", [CTX, -1])
def test_attention_mask_is_causal_before_the_boundary_and_the_shifted_stage_band_after(ctx):
    boundary = np.array([0, 3, 7, T - 1])
    for stage in range(K):
        ours = hybrid_attention_mask(jnp.asarray(boundary), jnp.int32(stage), length=T, n_q=K, subcodes_context=ctx)
        np.testing.assert_array_equal(np.asarray(ours), _numpy_mask(boundary, stage, T, K, ctx))


def test_span_tables_and_suffix_masks_follow_the_suffix_length():
    tables = masking.span_count_tables(T, 3)
    for n in range(1, T + 1):
        np.testing.assert_array_equal(tables[n], masking.span_count_table(n, 3))
    rng = np.random.default_rng(0)
    noise, rates = rng.random((6, T), np.float32), rng.uniform(0.05, 1.0, 6).astype(np.float32)
    start = np.array([0, 2, 5, 9, 11, 4])
    for span_len in (3, 1):
        ours = np.asarray(
            masking.suffix_time_mask_from_noise(
                jnp.asarray(noise), jnp.asarray(rates), jnp.asarray(start), tables, span_len
            )
        )
        for b in range(6):
            n = T - start[b]
            count = max(1, tables[n][int(np.round(100 * rates[b]))]) if span_len > 1 else max(1, round(n * rates[b]))
            suffix = np.arange(start[b], T)
            starts = suffix[np.argsort(noise[b, start[b] :], kind="stable")[:count]]
            expected = np.zeros(T, bool)
            for s in starts:
                expected[s : s + span_len] = True
            np.testing.assert_array_equal(ours[b], expected)
            assert not ours[b, : start[b]].any()


def _draw(seed, batch=6):
    codes = np.random.default_rng(seed).integers(0, CARD, (batch, K, T)).astype(np.int32)
    drawn = masking.hybrid_batch(jax.random.key(seed), jnp.asarray(codes), masking.span_count_tables(T, 3), 3, CARD)
    return codes, jax.device_get(drawn)


def test_inputs_and_loss_positions_cover_the_prefix_and_the_masked_suffix_only():
    codes, drawn = _draw(1)
    stage, boundary, mask = int(drawn.stage), np.asarray(drawn.boundary), np.asarray(drawn.mask)
    t = np.arange(T)
    expected_inputs, ar_count = codes.copy(), 0
    for b in range(len(codes)):
        assert not mask[b, : max(boundary[b] - stage, 0)].any() and mask[b].any()
        for q in range(K):
            ar_count += np.sum(t < boundary[b] - q)
            if q > stage:
                expected_inputs[b, q, t >= boundary[b] - q] = CARD
        expected_inputs[b, stage, mask[b]] = CARD
    np.testing.assert_array_equal(drawn.inputs, expected_inputs)

    logits = jax.random.normal(jax.random.key(2), (len(codes), K, T, CARD))
    sums = masking.hybrid_cross_entropy(logits, codes, boundary, stage, mask)
    assert float(sums["ar_count"]) == ar_count and float(sums["nar_count"]) == mask.sum()
    # Through the layout: head q's row t + q carries frame t; every other logit is outside the loss.
    layout_logits = jax.random.normal(jax.random.key(3), (len(codes), K, T + K, CARD))
    grad = jax.grad(
        lambda x: sum(
            v
            for k, v in masking.hybrid_cross_entropy(
                codebook_patterns.frame_logits(x, T), codes, boundary, stage, mask
            ).items()
            if k.endswith("_ce")
        )
    )(layout_logits)
    covered = np.zeros((len(codes), K, T + K), bool)
    for b in range(len(codes)):
        for q in range(K):
            for frame in range(T):
                covered[b, q, frame + q] = frame < boundary[b] - q or (q == stage and mask[b, frame])
    touched = np.abs(np.asarray(grad)).sum(-1) > 0
    np.testing.assert_array_equal(touched, covered)


def _tiny_model(seed=0):
    config = LMConfig(dim=32, num_heads=2, num_layers=2, n_q=K, card=CARD, cond_dim=16, subcodes_context=CTX)
    model = LanguageModel(config)
    params = nn.meta.unbox(init_params(model, jax.random.key(seed)))
    # Sharper heads than the init so that greedy outputs are not one repeated token.
    params = {**params, **{f"head_{q}": {"kernel": 8.0 * params[f"head_{q}"]["kernel"]} for q in range(K)}}
    return model, params


def _condition(batch, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, 5), np.int32)
    mask[1, 3:] = 0
    return TextConditioning(
        states=jnp.asarray(rng.standard_normal((batch, 5, 16)), jnp.float32),
        mask=jnp.asarray(mask),
        attend=jnp.asarray(mask.astype(bool)),
    )


def test_prefix_logits_never_see_suffix_inputs():
    model, params = _tiny_model()
    codes, drawn = _draw(4)
    cond = _condition(len(codes))
    condition = model.apply({"params": params}, cond.states, cond.mask, method=model.project_condition)
    other = np.random.default_rng(5).integers(0, CARD, codes.shape).astype(np.int32)
    boundary = np.asarray(drawn.boundary)
    prefix = np.arange(T)[None, None] < boundary[:, None, None] - np.arange(K)[None, :, None]
    changed = masking.hybrid_inputs(
        jnp.asarray(np.where(prefix, codes, other)), drawn.stage, boundary, drawn.mask, CARD
    )
    run = jax.jit(
        lambda x: objectives.HYBRID.logits(
            model, {"params": params}, x, drawn.stage, condition, cond.attend, boundary=boundary
        )
    )
    before, after = np.asarray(run(drawn.inputs)), np.asarray(run(changed))
    np.testing.assert_array_equal(before[prefix], after[prefix])
    assert prefix.sum() > 0 and np.abs(before[~prefix] - after[~prefix]).max() > 1e-3


# --- train / eval steps on the (2, 2, 2) mesh ---------------------------------------------------------------
CORPUS = ["rock music with heavy drums", "calm jazz piano at night", "ambient synth pad", "upbeat pop song"] * 8


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    directory = t5_weights.write_random_t5(tmp_path_factory.mktemp("t5"), corpus=CORPUS)
    t5_config, params = t5_weights.load_t5(str(directory))
    return t5_config, params, TextTokenizer(str(directory), max_length=8)


def _train_config(**optim):
    c = get_config("size=tiny,objective=hybrid")
    c.data.segment_seconds = 0.32  # T = 16 frames
    c.optim.update({**dict(lr=3e-3, warmup_steps=2, total_steps=100), **optim})
    return c


def _batch(config, tokenizer, size=8):
    rng = np.random.default_rng(0)
    t = np.arange(config.data.seq_len)
    period, offset = rng.integers(2, 6, size)[:, None, None], rng.integers(0, 64, size)[:, None, None]
    codes = (offset + 3 * (t[None, None] % period) + 5 * np.arange(4)[None, :, None]) % config.model.card
    tokens = tokenizer([CORPUS[i] for i in rng.integers(0, 4, size)])
    pad = ((0, 0), (0, 8 - tokens["ids"].shape[1]))
    return {
        "codes": codes.astype(np.int32),
        "text_ids": np.pad(tokens["ids"], pad),
        "text_mask": np.pad(tokens["mask"], pad),
    }


def test_hybrid_train_step_learns_on_the_222_mesh_and_eval_reports_both_parts(tiny_t5):
    t5_config, t5_params, tokenizer = tiny_t5
    config = _train_config()
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = sharding.logical_rules(config)
    state = train_lib.create_train_state(config, jax.random.key(0), mesh=mesh)
    step = train_lib.make_train_step(config, mesh, t5_config)
    t5_params = jax.device_put(t5_params, t5.param_shardings(t5_config, mesh, rules))
    batch = jax.device_put(_batch(config, tokenizer), sharding.batch_sharding(mesh, rules))
    losses = []
    for _ in range(30):
        state, metrics = step(state, t5_params, batch, jax.random.key(7))
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["nar_loss"])) and 0 < float(metrics["mask_fraction"]) < 1
    start, end = np.mean(losses[:4]), np.mean(losses[-6:])
    print(f"hybrid loss {start:.3f} -> {end:.3f}")
    assert end < 0.6 * start and int(state.skipped_steps) == 0

    evaluate = train_lib.make_eval_step(config, mesh, t5_config)
    scores = jax.device_get(evaluate(state.params, t5_params, batch, jax.random.key(3)))
    stages = [float(scores[f"loss_stage{s}"]) for s in range(K)]
    assert all(np.isfinite(stages)) and np.isfinite(float(scores["ar_loss"])) and np.isfinite(scores["nar_loss"])
    np.testing.assert_allclose(scores["loss"], np.mean(stages), rtol=1e-6)


def test_hybrid_objective_rejects_a_causal_model(tiny_t5):
    config = _train_config()
    config.model.causal = True
    with pytest.raises(ValueError, match="train.objective='hybrid' needs a non-causal model"):
        train_lib.make_train_step(
            config, sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]), tiny_t5[0]
        )


# --- generation ---------------------------------------------------------------------------------------------
GREEDY = DecodeParams(decoding_steps=(3, 2, 2, 2), use_sampling=False, span_len=3)
AR_SAMPLE = musicgen.sampler(top_k=8)  # the default top-k 250 exceeds the tiny vocabulary


def test_hybrid_generation_freezes_the_autoregressive_prefix_and_is_deterministic_when_greedy():
    model, params = _tiny_model()
    cond, key, b = _condition(2), jax.random.key(11), 5
    out = np.asarray(
        hybrid.generate_hybrid_codes(
            model, params, cond, key, GREEDY, length=T, prefix_frames=b, ar_sample=musicgen.greedy
        )
    )
    again = np.asarray(
        hybrid.generate_hybrid_codes(
            model, params, cond, key, GREEDY, length=T, prefix_frames=b, ar_sample=musicgen.greedy
        )
    )
    np.testing.assert_array_equal(out, again)
    assert out.shape == (2, K, T) and out.max() < CARD and len(np.unique(out)) > 4
    ar_keys, _ = hybrid.phase_keys(key, 2)
    prefix = np.asarray(
        jax.jit(
            lambda p: hybrid.autoregressive_prefix(
                model, p, cond, ar_keys, length=T, prefix_frames=b, sample_fn=musicgen.greedy
            )
        )(params)
    )
    for q in range(K):
        np.testing.assert_array_equal(out[:, q, : b - q], prefix[:, q, : b - q])
        assert (prefix[:, q, b - q :] == CARD).all() and (prefix[:, q, : b - q] < CARD).all()
    # Sampled: the prefix is still the AR phase's (same split key), the rest differs from the greedy run.
    sampled = np.asarray(
        hybrid.generate_hybrid_codes(
            model,
            params,
            cond,
            key,
            DecodeParams(decoding_steps=(3, 2, 2, 2), span_len=3),
            length=T,
            prefix_frames=b,
            ar_sample=AR_SAMPLE,
        )
    )
    ar_sampled = np.asarray(
        jax.jit(
            lambda p: hybrid.autoregressive_prefix(
                model, p, cond, ar_keys, length=T, prefix_frames=b, sample_fn=AR_SAMPLE
            )
        )(params)
    )
    for q in range(K):
        np.testing.assert_array_equal(sampled[:, q, : b - q], ar_sampled[:, q, : b - q])
    assert sampled.max() < CARD and (sampled != out).any()


def test_ar_phase_over_the_whole_layout_is_generate_ar_and_teacher_forced_argmax():
    model, params = _tiny_model(1)
    cond, key = _condition(2, seed=1), jax.random.key(5)
    keys = jax.random.split(key, 2)
    prefix = np.asarray(
        jax.jit(
            lambda p: hybrid.autoregressive_prefix(
                model, p, cond, keys, length=T, prefix_frames=T, sample_fn=musicgen.greedy
            )
        )(params)
    )
    both = jnp.concatenate
    condition = model.apply(
        {"params": params},
        both([cond.states, 0 * cond.states]),
        both([cond.mask, 0 * cond.mask]),
        method=model.project_condition,
    )
    attend = both([cond.attend, cond.attend])
    reference, layout = musicgen.generate_ar(
        model, params, condition, attend, key, length=T, cfg_coef=3.0, sample_fn=musicgen.greedy, return_layout=True
    )
    reference = np.asarray(reference)
    valid = np.arange(T)[None, :] < T - np.arange(K)[:, None]
    np.testing.assert_array_equal(prefix[:, valid], reference[:, valid])
    assert len(np.unique(prefix[:, valid])) > 4
    # The cache path attends causally: one full pass with a causal mask over the generated layout gives, row by
    # row, guided logits whose argmax is the next column.
    steps = T + K
    logits = model.apply(
        {"params": params},
        both([layout, layout]),
        condition,
        attend,
        self_mask=jnp.tril(jnp.ones((steps, steps), bool))[None, None],
    )
    cond_logits, uncond_logits = jnp.split(logits, 2)
    guided = uncond_logits + 3.0 * (cond_logits - uncond_logits)
    predicted = np.argmax(np.asarray(codebook_patterns.frame_logits(guided, T)), -1)
    np.testing.assert_array_equal(predicted[:, valid], prefix[:, valid])

    # Sampled: row b is generate_ar of that row alone (with its null twin) under its own key.
    sampled = np.asarray(
        jax.jit(
            lambda p: hybrid.autoregressive_prefix(model, p, cond, keys, length=T, prefix_frames=T, sample_fn=AR_SAMPLE)
        )(params)
    )
    for row in range(2):
        one = slice(row, row + 1)
        row_condition = model.apply(
            {"params": params},
            both([cond.states[one], 0 * cond.states[one]]),
            both([cond.mask[one], 0 * cond.mask[one]]),
            method=model.project_condition,
        )
        reference = np.asarray(
            musicgen.generate_ar(
                model,
                params,
                row_condition,
                both([cond.attend[one]] * 2),
                keys[row],
                length=T,
                cfg_coef=3.0,
                sample_fn=AR_SAMPLE,
            )
        )
        np.testing.assert_array_equal(sampled[row][valid], reference[0][valid])
    assert (sampled[:, valid] != prefix[:, valid]).any()
