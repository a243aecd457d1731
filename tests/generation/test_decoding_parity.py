"""Greedy MAGNeT decoding against two references on the same random weights.

1. A step-by-step NumPy implementation of docs/design.md §6.3/§6.9, written here from that description (it only borrows
the LM
   forward pass and torch's float32 schedule arithmetic), for every span arrangement / scoring, with and without a
   prompt.
2. audiocraft 1.3.0's own `MagnetLMModel.generate(use_sampling=False)` (the oracle of docs/design.md §11, xformers
   path emulated with SDPA so the stage >= 1 band mask is honoured).

Random LMs are unconfident (docs/design.md §11): the heads are scaled up, and the NumPy reference asserts at every
step that the decisions which select tokens and re-masked units have margins far above float noise (top-2 logit
gap >= 1e-4, no near-ties at the re-masking boundary), so exact equality is meaningful and not flaky.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.checkpoints.lm_weights import params_from_audiocraft
from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.generation.sampling import FROZEN_SCORE, least_probable_span_mask
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.lm import LanguageModel, LMConfig
from references.audiocraft_lm import lm_state, magnet_generate, token_conditioned_magnet

torch = pytest.importorskip("torch")

CONFIG = LMConfig(dim=32, num_heads=4, num_layers=2, card=32, cond_dim=16, n_q=4)
LENGTH = 47  # nonoverlap trims to 45 (whole chunks), stride1 keeps 47
STEPS = (5, 3, 3, 2)
PROMPT_LEN = 7  # not a multiple of 3: one chunk holds prompt and generated frames
DESCRIPTIONS = ["3 17 5 9", "40"]  # token ids of the test conditioner; rows of different lengths
N_BINS = 64
HEAD_SCALE = 4.0
LOGIT_GAP = 1e-4
SCORE_GAP = 1e-5
SETTINGS = [("nonoverlap", "max"), ("nonoverlap", "prod"), ("stride1", "max")]


# ----------------------------------------------------------------------------------------------------------------
# NumPy reference (docs/design.md §6.3, §6.4, §6.9), greedy
# ----------------------------------------------------------------------------------------------------------------


def reference_schedule(n_steps, n_gen, max_cfg, min_cfg, temperature):
    """The reference's per-step (units, cfg, temperature), with torch float32 scalars as in audiocraft."""
    out = []
    for i, tau in enumerate(torch.linspace(0, 1, n_steps)):
        mask_p = torch.cos(tau * math.pi * 0.5)
        units = max(int((mask_p * n_gen).item()), 1)
        cfg = float(mask_p) * max_cfg + (1 - float(mask_p)) * min_cfg
        temp = max(temperature * ((n_steps - 1 - i) / n_steps), 1e-2)
        out.append((units, np.float32(cfg), np.float32(temp)))
    return out


def _check_boundary(sorted_desc, u, what):
    if 0 < u < len(sorted_desc):
        gap = sorted_desc[u - 1] - sorted_desc[u]
        assert gap > SCORE_GAP, f"{what}: near-tie at the re-masking boundary ({gap:g}); pick other weights"


def reference_span_mask(scores, k, span_len, check):
    """§6.9 least-probable-span masking for one row, with Python's binary search."""
    length = len(scores)
    span = np.array([sum(scores[j + o] for o in range(span_len)) for j in range(length - span_len + 1)], np.float32)
    order = np.argsort(-span, kind="stable")

    def union(u):
        if check:
            _check_boundary(span[order], u, "stride1 spans")
        mask = np.zeros(length, bool)
        for j in order[:u]:
            mask[j : j + span_len] = True
        return mask

    k = max(k, span_len)
    lo, hi = k // span_len, k - span_len + 1
    mid = round(0.5 * (lo + hi))
    if mid in (lo, hi):
        return union(mid)
    while lo < mid < hi:
        mask = union(mid)
        if mask.sum() > k:
            hi = mid
        else:
            lo = mid
        mid = round(0.5 * (lo + hi))
    return mask


def test_span_mask_matches_reference_binary_search():
    """stride1 masking vs the Python search of §6.9 on rows with sampled and frozen tokens, for every target k."""
    rng = np.random.default_rng(0)
    mask_fn = jax.jit(jax.vmap(least_probable_span_mask, in_axes=(0, None, None)), static_argnums=2)
    for span_len in (2, 3, 4):
        scores = rng.exponential(size=(6, 40)).astype(np.float32)
        scores[1:3][rng.uniform(size=(2, 40)) < 0.5] = FROZEN_SCORE  # frozen tokens: many tied span sums
        for k in range(1, 41):
            expected = np.stack([reference_span_mask(row, k, span_len, check=False) for row in scores])
            np.testing.assert_array_equal(
                np.asarray(mask_fn(jnp.asarray(scores), k, span_len)), expected, err_msg=f"span_len={span_len} k={k}"
            )


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_generate(forward, batch, dp, length, prompt=None):
    """Greedy MAGNeT decoding; `forward(codes [2B, K, T], stage) -> logits [2B, K, T, V]` ([cond; null] rows)."""
    mask_id, span_len = CONFIG.card, dp.span_len
    tp = 0 if prompt is None else prompt.shape[-1]
    codes = np.full((batch, CONFIG.n_q, length), mask_id, np.int64)
    codes[..., :tp] = prompt if prompt is not None else 0
    chunked = span_len > 1 and dp.span_arrangement == "nonoverlap"
    t = (length // span_len) * span_len if chunked else length  # chunk mode trims to whole chunks
    codes = codes[..., :t]
    n_units, n_prompt_units = (t // span_len, tp // span_len) if chunked else (t, tp)
    for stage, n_steps in enumerate(dp.decoding_steps):
        x = np.full((batch, t), mask_id, np.int64)
        scores = np.zeros((batch, n_units), np.float32)
        scores[:, :n_prompt_units] = -1e4
        schedule = reference_schedule(n_steps, n_units - n_prompt_units, dp.max_cfg, dp.min_cfg, dp.temperature)
        for i, (k, cfg, temp) in enumerate(schedule):
            check = i > 0  # at step 0 every unit is masked already
            if chunked or span_len == 1:
                order = np.argsort(-scores, axis=-1, kind="stable")
                chosen = np.zeros_like(scores, bool)
                for b in range(batch):
                    chosen[b, order[b, :k]] = True
                    if check:
                        _check_boundary(scores[b, order[b]], k, "chunks")
                remask = np.repeat(chosen, span_len, axis=-1) if chunked else chosen
            else:
                remask = np.stack([reference_span_mask(scores[b], k, span_len, check) for b in range(batch)])
            x[remask] = mask_id
            if tp:
                x[:, :tp] = prompt[:, stage]
            codes[:, stage] = x
            logits = np.asarray(forward(np.concatenate([codes, codes]), stage), np.float32)
            cond, uncond = logits[:batch, stage], logits[batch:, stage]
            guided = uncond + (cond - uncond) * cfg
            probs = softmax(guided / temp)
            tokens = guided.argmax(-1)
            masked = x == mask_id
            top2 = np.sort(guided, axis=-1)[..., -2:]
            decisive = (masked | np.repeat(chosen, span_len, axis=-1)) if chunked else masked
            assert np.all((top2[..., 1] - top2[..., 0])[decisive] >= LOGIT_GAP), "top-2 logits too close"
            x = np.where(masked, tokens, x)
            codes[:, stage] = x
            q = np.take_along_axis(probs, tokens[..., None], -1)[..., 0]
            if chunked:
                q = q.reshape(batch, n_units, span_len)
                scores = (1 - q.max(-1)) if dp.span_scoring == "max" else (-np.log(q)).sum(-1, dtype=np.float32)
                scores = np.where(chosen, scores, -1e4).astype(np.float32)
            else:
                scores = np.where(masked, -np.log(q), -1e4).astype(np.float32)
    return codes


# ----------------------------------------------------------------------------------------------------------------
# Shared weights: an audiocraft MagnetLMModel and the same weights in our param tree
# ----------------------------------------------------------------------------------------------------------------


def _tokenize(descriptions):
    """Space-separated token ids; None = null condition (one position, mask 0); padded to the longest."""
    rows = [[int(w) for w in d.split()] if d is not None else [0] for d in descriptions]
    longest = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), longest), np.int64), np.zeros((len(rows), longest), np.int64)
    for i, (r, d) in enumerate(zip(rows, descriptions)):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = d is not None
    return ids, mask


@pytest.fixture(scope="module")
def oracle():
    lm, table = token_conditioned_magnet(CONFIG, _tokenize, n_bins=N_BINS)
    with torch.no_grad():
        for head in lm.linears:
            head.weight.mul_(HEAD_SCALE)
    params = jax.tree.map(jnp.asarray, params_from_audiocraft(lm_state(lm), CONFIG, source="audiocraft oracle"))
    return lm, params, table


@pytest.fixture(scope="module")
def conditioning(oracle):
    _, _, table = oracle
    ids, mask = _tokenize(DESCRIPTIONS)
    return TextConditioning(jnp.asarray(table[ids]), jnp.asarray(mask, jnp.int32), None)


@pytest.fixture(scope="module")
def forward(oracle, conditioning):
    """Our LM on the [cond; null] batch (the reference's row order), for the NumPy reference."""
    _, params, _ = oracle
    model = LanguageModel(CONFIG)
    states = jnp.concatenate([conditioning.states, jnp.zeros_like(conditioning.states)])
    mask = jnp.concatenate([conditioning.mask, jnp.zeros_like(conditioning.mask)])
    condition = model.apply({"params": params}, states, mask, method=model.project_condition)
    apply = jax.jit(lambda codes, stage: model.apply({"params": params}, codes, condition, None, stage))
    return lambda codes, stage: apply(jnp.asarray(codes, jnp.int32), stage)


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(1).integers(0, CONFIG.card, (len(DESCRIPTIONS), CONFIG.n_q, PROMPT_LEN))


def _decode_params(arrangement, scoring):
    return DecodeParams(
        decoding_steps=STEPS,
        use_sampling=False,
        temperature=3.0,
        top_p=0.9,
        max_cfg=10.0,
        min_cfg=1.0,
        span_arrangement=arrangement,
        span_scoring=scoring,
        span_len=3,
    )


def _audiocraft_generate(lm, dp, prompt):
    return magnet_generate(lm, DESCRIPTIONS, dp, length=LENGTH, prompt=prompt).numpy()


@pytest.mark.parametrize("arrangement,scoring", SETTINGS)
def test_greedy_codes_match_numpy_reference_and_audiocraft(oracle, conditioning, forward, prompt, arrangement, scoring):
    lm, params, _ = oracle
    dp = _decode_params(arrangement, scoring)
    model = LanguageModel(CONFIG)
    for p in (None, prompt):
        ours = np.asarray(
            generate_codes(
                model,
                params,
                conditioning,
                jax.random.key(0),
                dp,
                length=LENGTH,
                prompt=None if p is None else jnp.asarray(p, jnp.int32),
            )
        )
        reference = reference_generate(forward, len(DESCRIPTIONS), dp, LENGTH, prompt=p)
        expected_len = 45 if arrangement == "nonoverlap" else LENGTH
        assert ours.shape == (len(DESCRIPTIONS), CONFIG.n_q, expected_len)
        # Non-degenerate: every codebook of every row uses several distinct tokens, and rows differ.
        assert all(len(np.unique(ours[b, k])) >= 3 for b in range(ours.shape[0]) for k in range(CONFIG.n_q))
        assert not np.array_equal(ours[0], ours[1])
        np.testing.assert_array_equal(ours, reference)
        np.testing.assert_array_equal(ours, _audiocraft_generate(lm, dp, p))
        if p is not None:
            np.testing.assert_array_equal(ours[..., :PROMPT_LEN], p)
    # Greedy decoding does not depend on the key.
    other_key = generate_codes(model, params, conditioning, jax.random.key(1), dp, length=LENGTH)
    np.testing.assert_array_equal(np.asarray(other_key), reference_generate(forward, len(DESCRIPTIONS), dp, LENGTH))
