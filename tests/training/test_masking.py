"""The span-masked objective against the spec's worked values and audiocraft's own MagnetSolver functions."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magnet_jax.training import masking
from references import audiocraft_stubs


@pytest.fixture(scope="module")
def solver():
    """audiocraft's MagnetSolver class (its masking methods are called unbound with a minimal `self`)."""
    audiocraft_stubs.install()
    from audiocraft.solvers.magnet import MagnetSolver

    return MagnetSolver


def _solver_self(solver, span_len, table=None):
    """A stand-in `self` with the solver's config fields, LUT and mask methods bound to it."""
    cfg = types.SimpleNamespace(masking=types.SimpleNamespace(span_len=span_len))
    this = types.SimpleNamespace(cfg=cfg, mean_maskrate_to_u=None if table is None else torch.tensor(table))
    for name in ("_spans_mask", "_non_spans_mask"):
        setattr(this, name, types.MethodType(getattr(solver, name), this))
    return this


@pytest.mark.parametrize(
    "seq_len,expected", [(500, [18, 46, 103, 185, 268, 498]), (1500, [52, 138, 310, 555, 804, 1498])]
)
def test_span_count_table_reproduces_spec_worked_values(seq_len, expected):
    table = masking.span_count_table(seq_len, 3)
    assert [int(table[m]) for m in (10, 25, 50, 75, 90, 100)] == expected


@pytest.mark.parametrize("seq_len,span_len", [(500, 3), (1500, 3), (48, 3), (250, 5), (100, 1)])
def test_span_count_table_equals_audiocraft_lut(solver, seq_len, span_len):
    ours = masking.span_count_table(seq_len, span_len)
    ref = solver._calc_mean_maskrate_to_u_LUT(_solver_self(solver, span_len), seq_len)
    assert ours.tolist() == list(ref)


def _distinct_noise(rng, batch, length):
    """Uniform-like noise with no ties, so argsort is unambiguous in both frameworks."""
    return np.stack([rng.permutation(length) for _ in range(batch)]).astype(np.float32) / length


@pytest.mark.parametrize("seq_len,span_len", [(50, 3), (500, 3), (60, 1)])
def test_time_mask_equals_audiocraft_on_same_noise(solver, monkeypatch, seq_len, span_len):
    rng = np.random.default_rng(0)
    batch = 64
    rates = np.concatenate([[0.0, 1.0, 0.125, 0.005, 0.995], np.cos(0.5 * np.pi * rng.uniform(size=batch - 5))]).astype(
        np.float32
    )
    noise = _distinct_noise(rng, batch, seq_len)
    table = masking.span_count_table(seq_len, span_len)

    monkeypatch.setattr(torch, "rand", lambda shape, device=None: torch.from_numpy(noise.copy()))
    this = _solver_self(solver, span_len, table)
    ref = solver._get_mask(this, torch.from_numpy(rates), batch, seq_len, "cpu").numpy()
    ours = np.asarray(masking.time_mask_from_noise(jnp.asarray(noise), jnp.asarray(rates), table, span_len))
    assert ref.any(axis=1).all() and not ref.all()  # non-degenerate: every row masked somewhere, not everything
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_mean_masked_fraction_follows_rate(rate):
    seq_len, span_len, batch = 500, 3, 512
    table = masking.span_count_table(seq_len, span_len)
    mask = masking.time_mask(jax.random.key(1), jnp.full((batch,), rate), seq_len, table, span_len)
    fraction = float(mask.mean())
    u = int(table[round(100 * rate)])
    expected = 1.0 - math.comb(seq_len - span_len, u) / math.comb(seq_len, u)  # App. C, before end truncation
    assert abs(fraction - rate) < 0.01
    assert abs(fraction - expected) < 0.005


def test_mask_rates_follow_cosine_schedule():
    rates = np.asarray(masking.sample_mask_rates(jax.random.key(2), 20000))
    assert rates.min() >= 0.0 and rates.max() <= 1.0
    assert abs(rates.mean() - 2 / np.pi) < 0.01  # E[cos(pi u / 2)], u ~ U(0, 1)
    assert abs(np.median(rates) - np.cos(np.pi / 4)) < 0.01


def test_spans_are_truncated_at_the_end_not_wrapped():
    seq_len = 20
    table = masking.span_count_table(seq_len, 3)
    for start, expected in ((seq_len - 1, [seq_len - 1]), (seq_len - 2, [seq_len - 2, seq_len - 1]), (5, [5, 6, 7])):
        # The reference's starts are the t with argsort(noise)[t] < k; rate 0 gives k = max(1, u(0)) = 1, and
        # argsort(noise)[start] == 0 when noise[0] has rank `start`.
        ranks = [start] + [r for r in range(seq_len) if r != start]
        noise = np.asarray([ranks], np.float32) / seq_len
        mask = masking.time_mask_from_noise(jnp.asarray(noise), jnp.zeros((1,)), table, 3)
        assert np.flatnonzero(np.asarray(mask[0])).tolist() == expected


def test_masked_runs_are_unions_of_full_spans():
    seq_len, span_len = 200, 3
    table = masking.span_count_table(seq_len, span_len)
    rates = masking.sample_mask_rates(jax.random.key(3), 64)
    mask = np.asarray(masking.time_mask(jax.random.key(4), rates, seq_len, table, span_len))
    for row in mask:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        starts, ends = edges[::2], edges[1::2]
        inner = ends < seq_len  # runs touching the end may be cut short
        assert (ends - starts)[inner].min(initial=span_len) >= span_len


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_masking_keeps_lower_masks_upper_codebooks(stage):
    codes = jax.random.randint(jax.random.key(5), (4, 4, 30), 0, 64)
    mask = jax.random.bernoulli(jax.random.key(6), 0.4, (4, 30))
    inputs = np.asarray(masking.mask_codes(codes, jnp.int32(stage), mask, 64))
    codes, mask = np.asarray(codes), np.asarray(mask)
    np.testing.assert_array_equal(inputs[:, :stage], codes[:, :stage])
    assert (inputs[:, stage + 1 :] == 64).all()
    np.testing.assert_array_equal(inputs[:, stage], np.where(mask, 64, codes[:, stage]))


def test_stage_is_traced_one_compilation_for_all_stages():
    traces = []

    @jax.jit
    def inputs_for(codes, stage, mask):
        traces.append(1)
        return masking.mask_codes(codes, stage, mask, 64)

    codes = jnp.zeros((2, 4, 12), jnp.int32)
    mask = jnp.ones((2, 12), bool)
    outs = [inputs_for(codes, jnp.int32(s), mask) for s in range(4)]
    assert len(traces) == 1
    assert [int((o == 64).sum()) for o in outs] == [96, 72, 48, 24]


def test_cross_entropy_equals_audiocraft_on_masked_tokens_of_stage(solver):
    rng = np.random.default_rng(7)
    batch, n_q, length, card = 3, 4, 16, 32
    logits = rng.normal(size=(batch, n_q, length, card)).astype(np.float32) * 3
    targets = rng.integers(0, card, size=(batch, n_q, length))
    time = rng.uniform(size=(batch, length)) < 0.4
    for stage in range(n_q):
        loss_mask = np.zeros((batch, n_q, length), bool)
        loss_mask[:, stage] = time
        ref = solver._compute_cross_entropy_magnet(
            None,
            torch.from_numpy(logits),
            torch.from_numpy(targets.copy()),
            torch.from_numpy(loss_mask),
            torch.full((1,), stage),
        ).item()
        ce_sum, count = masking.masked_cross_entropy(
            jnp.asarray(logits), jnp.asarray(targets), jnp.int32(stage), jnp.asarray(time)
        )
        assert int(count) == time.sum()
        np.testing.assert_allclose(float(ce_sum / count), ref, rtol=1e-6)


def test_mask_batch_draws_one_stage_uniformly():
    codes = jnp.zeros((2, 4, 24), jnp.int32)
    table = masking.span_count_table(24, 3)
    draw = jax.jit(jax.vmap(lambda k: masking.mask_batch(k, codes, table, 3, 64).stage))
    stages = np.asarray(draw(jax.random.split(jax.random.key(8), 4000)))
    counts = np.bincount(stages, minlength=4)
    assert counts.sum() == 4000 and np.all(np.abs(counts / 4000 - 0.25) < 0.03)
