"""Model rescoring (paper Eq. 5) in the MAGNeT decoder, MusicGen's teacher-forced token probabilities, and the
composition-mode hybrid's autoregressive prefix."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

from magnet_jax.checkpoints.lm_weights import import_transformers
from magnet_jax.generation.decoding import (
    DecodeParams,
    DecodeState,
    PrefixParams,
    decode_step,
    generate_codes,
    generate_prefix,
    guided_logits_fn,
    rescore_fn,
)
from magnet_jax.generation.musicgen import generate_ar, token_probs
from magnet_jax.generation.sampling import FROZEN_SCORE, least_probable_span_mask
from magnet_jax.models.codebook_patterns import apply_delay_pattern
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

MAGNET = LMConfig(dim=32, num_heads=4, num_layers=2, card=32, cond_dim=16, n_q=4)
MUSICGEN = LMConfig(dim=32, num_heads=4, num_layers=2, card=32, cond_dim=16, n_q=4, causal=True)
MASK = MAGNET.card
STEPS = DecodeParams(decoding_steps=(4, 3, 3, 2))


def _init(config, seed):
    model = LanguageModel(config)
    return model, jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))(jax.random.key(seed))


@pytest.fixture(scope="module")
def magnet():
    return _init(MAGNET, 0)


@pytest.fixture(scope="module")
def rescorer():
    model, params = _init(MUSICGEN, 1)
    # Random LMs are unconfident (every probability ~1/card): sharpen the heads so the rescorer has opinions.
    return model, {**params, **{f"head_{k}": {"kernel": params[f"head_{k}"]["kernel"] * 8} for k in range(4)}}


def _conditioning(batch, key=3, length=5):
    states = jax.random.normal(jax.random.key(key), (batch, length, MAGNET.cond_dim))
    return TextConditioning(states, jnp.ones((batch, length), jnp.int32), None)


def _rescorer_probs(model, params, cond, codes, stage):
    """Independent reference: a full causal forward over the delay layout of `codes`, the softmax of head `stage`
    at the step that predicts each frame (frame t of codebook q is predicted at step t + q)."""
    condition = model.apply({"params": params}, cond.states, cond.mask, method=model.project_condition)
    logits = np.asarray(model.apply({"params": params}, apply_delay_pattern(codes, MASK), condition))
    length = codes.shape[-1]
    stage_logits = logits[:, stage, stage : stage + length]  # [B, T, card]
    probs = np.exp(stage_logits - stage_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.take_along_axis(probs, np.asarray(codes)[:, stage, :, None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# MusicGen teacher forcing
# ----------------------------------------------------------------------------------------------------------------


def test_token_probs_equal_transformers_teacher_forced_probabilities(tmp_path):
    V, K, D, B, L, T = 32, 4, 32, 2, 5, 12
    torch.manual_seed(0)
    hf = MusicgenForCausalLM(
        MusicgenDecoderConfig(
            vocab_size=V,
            num_codebooks=K,
            hidden_size=D,
            ffn_dim=4 * D,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=V,
            bos_token_id=V,
            decoder_start_token_id=V,
            max_position_embeddings=256,
        )
    ).eval()
    with torch.no_grad():
        for head in hf.lm_heads:
            head.weight.mul_(8)
    hf.save_pretrained(tmp_path)
    config, params = import_transformers(str(tmp_path))
    model = LanguageModel(LMConfig(**config["model"]))

    codes = np.random.default_rng(0).integers(0, V, (B, K, T))
    codes[:, 2:, T // 2 :] = V  # codebooks not decoded yet: the special id
    enc = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    condition = model.apply(
        {"params": params}, jnp.asarray(enc.numpy()), jnp.ones((B, L)), method=model.project_condition
    )
    cross_kv = model.apply({"params": params}, condition, method=model.cross_key_values)
    ours = np.asarray(jax.jit(lambda c: token_probs(model, params, c, cross_kv))(jnp.asarray(codes, jnp.int32)))

    layout = np.array(apply_delay_pattern(jnp.asarray(codes), V))
    with torch.no_grad():
        logits = hf(
            input_ids=torch.from_numpy(layout).reshape(B * K, T + K),
            encoder_hidden_states=enc,
            attention_mask=torch.ones(B * K, T + K, dtype=torch.long),
        ).logits
    probs = torch.softmax(logits.reshape(B, K, T + K, V).double(), dim=-1).numpy()
    expected = np.zeros((B, K, T))
    for q in range(K):
        for t in range(T):
            if codes[0, q, t] != V:
                expected[:, q, t] = probs[np.arange(B), q, t + q, codes[:, q, t]]
    assert ours.shape == (B, K, T)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7)
    assert np.all(ours[codes == V] == 0.0)
    real = ours[codes != V]
    assert probs.max() > 0.3 and real.max() / real.min() > 10  # a confident model, varied probabilities


# ----------------------------------------------------------------------------------------------------------------
# One decoding step: scores follow Eq. 5
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arrangement,scoring", [("nonoverlap", "prod"), ("stride1", "max")])
def test_rescored_step_scores_follow_eq5(magnet, rescorer, arrangement, scoring):
    model, params = magnet
    batch, length, stage, w = 2, 24, 1, 0.3
    dp = DecodeParams(span_arrangement=arrangement, span_scoring=scoring, rescore_weight=w)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, MAGNET.card, (batch, MAGNET.n_q, length))
    codes[:, 2:] = MASK  # later codebooks not decoded yet
    n_units = length // 3 if arrangement == "nonoverlap" else length
    scores = rng.uniform(0, 1, (batch, n_units)).astype(np.float32)
    k, temperature, cfg = 4 if arrangement == "nonoverlap" else 9, 1.5, 3.0
    cond = _conditioning(batch)

    def run(weight, with_rescorer):
        rescore = rescore_fn(*rescorer, cond) if with_rescorer else None
        return decode_step(
            guided_logits_fn(model, params, cond),
            dp,
            DecodeState(jnp.asarray(codes, jnp.int32), jnp.asarray(scores)),
            stage=jnp.int32(stage),
            step=jnp.int32(1),
            num_masked=jnp.int32(k),
            cfg_coef=jnp.float32(cfg),
            temperature=jnp.float32(temperature),
            prompt_row=jnp.full((batch, length), MASK),
            prompt_len=jnp.int32(0),
            row_keys=jax.random.split(jax.random.key(5), batch),
            mask_id=MASK,
            rescore=rescore,
            rescore_weight=weight,
        )

    step = jax.jit(run, static_argnums=1)
    rescored = step(jnp.float32(w), True)
    plain = step(jnp.float32(1.0), False)
    np.testing.assert_array_equal(rescored.codes, plain.codes)  # tokens still sampled from MAGNeT
    out = np.asarray(rescored.codes)

    # Expected: MAGNeT's tempered probabilities of the sampled tokens given the re-masked input, mixed with a
    # separate teacher-forced rescorer pass over the candidate.
    if arrangement == "nonoverlap":
        chosen = np.zeros_like(scores, bool)
        for b in range(batch):
            chosen[b, np.argsort(-scores[b])[:k]] = True
        remask = np.repeat(chosen, 3, axis=-1)
    else:
        remask = np.asarray(jax.vmap(least_probable_span_mask, in_axes=(0, None, None))(scores, k, 3))
    inputs = codes.copy()
    inputs[:, stage] = np.where(remask, MASK, codes[:, stage])
    logits = np.asarray(guided_logits_fn(model, params, cond)(jnp.asarray(inputs, jnp.int32), stage, cfg))
    p_magnet = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
    p_magnet = np.take_along_axis(p_magnet, out[:, stage, :, None], axis=-1)[..., 0]
    p_rescorer = _rescorer_probs(*rescorer, cond, jnp.asarray(out), stage)
    p = w * p_magnet + (1 - w) * p_rescorer
    if arrangement == "nonoverlap":
        chunks = p.reshape(batch, -1, 3)
        unit = 1 - chunks.max(-1) if scoring == "max" else (-np.log(chunks)).sum(-1)
        expected = np.where(chosen, unit, FROZEN_SCORE)
    else:
        expected = np.where(remask, -np.log(p), FROZEN_SCORE)
    np.testing.assert_allclose(np.asarray(rescored.scores), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(p_rescorer - p_magnet).max() > 0.1  # the rescorer changes the scores
    assert not np.allclose(np.asarray(rescored.scores), np.asarray(plain.scores), atol=1e-3)

    # w = 1 with a rescorer: MAGNeT's scores bit for bit.
    np.testing.assert_array_equal(np.asarray(step(jnp.float32(1.0), True).scores), np.asarray(plain.scores))


def _rescorer_dists(model, params, cond, codes, stage):
    """Independent reference of the rescorer's distributions `[B, T, card]` over codebook `stage` of `codes`."""
    condition = model.apply({"params": params}, cond.states, cond.mask, method=model.project_condition)
    logits = np.asarray(model.apply({"params": params}, apply_delay_pattern(codes, MASK), condition), np.float64)
    stage_logits = logits[:, stage, stage : stage + codes.shape[-1]]
    probs = np.exp(stage_logits - stage_logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def _nucleus(probs, top_p):
    """The reference's nucleus of each row of `probs [..., V]`: descending, a token dropped when the mass before it
    exceeds top_p; renormalised."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=-1)
    drop = np.cumsum(ranked, axis=-1) - ranked > top_p
    kept = np.zeros_like(probs)
    np.put_along_axis(kept, order, np.where(drop, 0.0, ranked), axis=-1)
    return kept / kept.sum(-1, keepdims=True)


@pytest.mark.parametrize("top_p", [0.0, 0.8])
def test_sample_mode_draws_from_the_eq5_mixture(magnet, rescorer, top_p):
    """Many rows of one input, each with its own key: the drawn tokens' frequencies follow w * p_magnet + (1 - w) *
    p_rescorer (chi-square bound), and are far from MAGNeT's own distribution; the scores are the mixed
    probabilities of the drawn tokens."""
    model, params = magnet
    rows, length, stage, w, k, temperature, cfg = 3000, 12, 1, 0.4, 2, 1.5, 3.0
    dp = DecodeParams(top_p=top_p, rescore_weight=w, rescore_mode="sample", span_scoring="prod")
    rng = np.random.default_rng(1)
    codes = np.repeat(rng.integers(0, MAGNET.card, (1, MAGNET.n_q, length)), rows, axis=0)
    codes[:, 2:] = MASK
    scores = np.repeat(np.array([[0.1, 0.9, 0.2, 0.8]], np.float32), rows, axis=0)  # chunks 1 and 3 re-masked
    cond = _conditioning(1)
    cond = TextConditioning(jnp.repeat(cond.states, rows, 0), jnp.repeat(cond.mask, rows, 0), None)

    @jax.jit
    def step(keys):
        return decode_step(
            guided_logits_fn(model, params, cond),
            dp,
            DecodeState(jnp.asarray(codes, jnp.int32), jnp.asarray(scores)),
            stage=jnp.int32(stage),
            step=jnp.int32(0),
            num_masked=jnp.int32(k),
            cfg_coef=jnp.float32(cfg),
            temperature=jnp.float32(temperature),
            prompt_row=jnp.full((rows, length), MASK),
            prompt_len=jnp.int32(0),
            row_keys=keys,
            mask_id=MASK,
            rescore=rescore_fn(*rescorer, cond, mode="sample"),
            rescore_weight=jnp.float32(w),
        )

    out = step(jax.random.split(jax.random.key(11), rows))
    drawn = np.asarray(out.codes)
    masked = np.repeat([False, True, False, True], 3)
    np.testing.assert_array_equal(drawn[:, :, ~masked], codes[:, :, ~masked])  # only the re-masked chunk positions
    np.testing.assert_array_equal(drawn[:, [0, 2, 3]], codes[:, [0, 2, 3]])

    inputs = codes[:1].copy()
    inputs[:, stage, masked] = MASK
    logits = np.asarray(
        guided_logits_fn(model, params, TextConditioning(cond.states[:1], cond.mask[:1], None))(
            jnp.asarray(inputs, jnp.int32), stage, cfg
        ),
        np.float64,
    )[0]
    p_magnet = np.exp(logits / temperature - (logits / temperature).max(-1, keepdims=True))
    p_magnet /= p_magnet.sum(-1, keepdims=True)
    own = _nucleus(p_magnet, top_p) if top_p else p_magnet
    p_rescorer = _rescorer_dists(
        *rescorer, TextConditioning(cond.states[:1], cond.mask[:1]), jnp.asarray(inputs), stage
    )[0]
    mixture = (w * own + (1 - w) * p_rescorer)[masked]  # [positions, card]

    tokens = drawn[:, stage][:, masked]  # [rows, positions]
    freq = np.stack([np.bincount(tokens[:, t], minlength=MAGNET.card) for t in range(tokens.shape[1])]) / rows

    def chi2(expected):
        cells = expected > 0
        return rows * np.sum((freq[cells] - expected[cells]) ** 2 / expected[cells]), cells.sum() - len(expected)

    stat, dof = chi2(mixture)
    bound = dof + 6 * np.sqrt(2 * dof)  # about 6 standard deviations of a chi-square with `dof` degrees of freedom
    assert stat < bound, (stat, dof)
    assert np.all(freq[mixture == 0] == 0)  # tokens outside both supports are never drawn
    assert np.abs(freq - mixture).max() < 6 * np.sqrt(0.25 / rows)
    assert chi2(own[masked])[0] > 20 * bound  # MAGNeT's own distribution is rejected: the test has power

    # Scores: the 'prod' chunk score of the drawn tokens' mixed probabilities (q = the tempered softmax).
    mixed = (
        w * np.take_along_axis(p_magnet[masked][None], tokens[..., None], -1)[..., 0]
        + (1 - w) * np.take_along_axis(p_rescorer[masked][None], tokens[..., None], -1)[..., 0]
    )
    expected = (-np.log(mixed)).reshape(rows, 2, 3).sum(-1)
    np.testing.assert_allclose(np.asarray(out.scores)[:, [1, 3]], expected, rtol=1e-4)
    assert np.all(np.asarray(out.scores)[:, [0, 2]] == FROZEN_SCORE)


def test_rank_mode_is_the_default_and_sample_mode_changes_the_tokens(magnet, rescorer):
    model, params = magnet
    cond = _conditioning(2)

    def run(**kw):
        dp = DecodeParams(decoding_steps=STEPS.decoding_steps, rescore_weight=0.3, **kw)
        return np.asarray(generate_codes(model, params, cond, jax.random.key(0), dp, length=30, rescorer=rescorer))

    default, rank, sample = run(), run(rescore_mode="rank"), run(rescore_mode="sample")
    np.testing.assert_array_equal(rank, default)
    assert np.mean(sample != rank) > 0.2 and sample.max() < MASK
    with pytest.raises(ValueError, match="rescore_mode='mix': expected one of"):
        DecodeParams(rescore_mode="mix")


# ----------------------------------------------------------------------------------------------------------------
# Whole generation
# ----------------------------------------------------------------------------------------------------------------


def test_weight_one_reproduces_plain_decoding(magnet, rescorer):
    model, params = magnet
    cond = _conditioning(2)
    plain = generate_codes(model, params, cond, jax.random.key(0), STEPS, length=30)
    with_rescorer = generate_codes(
        model,
        params,
        cond,
        jax.random.key(0),
        DecodeParams(decoding_steps=STEPS.decoding_steps, rescore_weight=1.0),
        length=30,
        rescorer=rescorer,
    )
    np.testing.assert_array_equal(np.asarray(with_rescorer), np.asarray(plain))
    rescored = generate_codes(
        model,
        params,
        cond,
        jax.random.key(0),
        DecodeParams(decoding_steps=STEPS.decoding_steps, rescore_weight=0.5),
        length=30,
        rescorer=rescorer,
    )
    assert np.mean(np.asarray(rescored) != np.asarray(plain)) > 0.2  # the re-masking choices changed


def test_a_rescorer_preferring_one_token_keeps_the_spans_holding_it(magnet, rescorer):
    model, params = magnet
    favourite = 7
    r_model, r_params = rescorer
    # out_norm -> constant ones, so every head's logits are its kernel's column sums: token 7 far above the rest.
    biased = {**r_params, "out_norm": {"scale": jnp.zeros(32), "bias": jnp.ones(32)}}
    for k in range(MUSICGEN.n_q):
        kernel = r_params[f"head_{k}"]["kernel"]
        biased[f"head_{k}"] = {"kernel": kernel.at[:, favourite].set(1.0)}
    cond = _conditioning(4)
    length, steps = 48, DecodeParams(decoding_steps=(8, 6, 6, 6), rescore_weight=0.1)
    plain = np.asarray(generate_codes(model, params, cond, jax.random.key(0), steps, length=length))
    rescored = np.asarray(
        generate_codes(model, params, cond, jax.random.key(0), steps, length=length, rescorer=(r_model, biased))
    )
    plain_count, rescored_count = (plain == favourite).sum(), (rescored == favourite).sum()
    assert plain_count > 0
    assert rescored_count > 2 * plain_count, (plain_count, rescored_count)


def test_rescorer_must_match_the_magnet_model(magnet, rescorer):
    model, params = magnet
    cond, key = _conditioning(2), jax.random.key(0)
    with pytest.raises(ValueError, match="rescorer: a non-causal"):
        generate_codes(model, params, cond, key, STEPS, length=30, rescorer=(model, params))
    for field, value in (("card", 64), ("n_q", 2), ("cond_dim", 8)):
        other = LanguageModel(LMConfig(**{**MUSICGEN.to_dict(), field: value}))
        with pytest.raises(ValueError, match=f"rescorer: {field}={value} but the MAGNeT model has {field}="):
            generate_codes(model, params, cond, key, STEPS, length=30, rescorer=(other, rescorer[1]))
    with pytest.raises(ValueError, match="rescore_weight=1.5"):
        DecodeParams(rescore_weight=1.5)


# ----------------------------------------------------------------------------------------------------------------
# Composition-mode hybrid: MusicGen prefix, MAGNeT finish
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_rows_are_generate_ar_and_stay_frozen_in_magnet_decoding(magnet, rescorer):
    model, params = magnet
    ar_model, ar_params = rescorer
    cond = _conditioning(3)
    keys = jax.random.split(jax.random.key(4), 3)
    greedy = PrefixParams(prefix_seconds=0.2, ar_use_sampling=False)
    prefix = np.asarray(generate_prefix(ar_model, ar_params, cond, keys, greedy, length=10))
    # Greedy rows are independent, so one batched generate_ar over the [cond rows; null rows] batch is the reference.
    states, mask = cond.states, cond.mask
    condition = ar_model.apply(
        {"params": ar_params},
        jnp.concatenate([states, jnp.zeros_like(states)]),
        jnp.concatenate([mask, jnp.zeros_like(mask)]),
        method=ar_model.project_condition,
    )
    expected = generate_ar(ar_model, ar_params, condition, None, jax.random.key(0), length=10, cfg_coef=3.0)
    np.testing.assert_array_equal(prefix, np.asarray(expected))
    assert len(np.unique(prefix)) > 5 and prefix.max() < MASK

    codes = np.asarray(generate_codes(model, params, cond, keys, STEPS, length=30, prompt=jnp.asarray(prefix)))
    np.testing.assert_array_equal(codes[..., :10], prefix)  # frozen prompt in every codebook
    assert codes.max() < MASK and len(np.unique(codes[..., 10:])) > 10

    # Sampled prefixes: a row depends on its own key only.
    sampled = PrefixParams(prefix_seconds=0.2, ar_top_k=8)
    a = np.asarray(generate_prefix(ar_model, ar_params, cond, keys, sampled, length=10))
    first_two = TextConditioning(cond.states[:2], cond.mask[:2])
    b = np.asarray(generate_prefix(ar_model, ar_params, first_two, keys[:2], sampled, length=10))
    c = np.asarray(
        generate_prefix(ar_model, ar_params, cond, jax.random.split(jax.random.key(5), 3), sampled, length=10)
    )
    np.testing.assert_array_equal(a[:2], b)
    assert np.mean(a != c) > 0.3
