"""Generation beyond the trained window (docs/design.md §6.13): the window plan, windows joined by continuation with
the real decoder, keys per row, and EnCodec decoding of long codes in bounded memory."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.magnet import get_config
from magnet_jax.generation import decoding, windows
from magnet_jax.generation.decoding import DecodeParams, generate_codes
from magnet_jax.generation.windows import WindowPlan
from magnet_jax.models import encodec
from magnet_jax.models.conditioner import TextConditioning
from magnet_jax.models.encodec import EncodecConfig
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

CONFIG = LMConfig(dim=32, num_heads=4, num_layers=2, card=32, cond_dim=16, n_q=4)
STEPS = DecodeParams(decoding_steps=(3, 2, 2, 2))
WINDOW = 24  # frames per window (a multiple of the 3-frame span)


@pytest.fixture(scope="module")
def lm():
    model = LanguageModel(CONFIG)
    return model, jax.jit(lambda key: nn.meta.unbox(init_params(model, key)))(jax.random.key(0))


def _conditioning(batch):
    states = jax.random.normal(jax.random.key(3), (batch, 5, CONFIG.cond_dim))
    return TextConditioning(states, np.ones((batch, 5), np.int32), None)


def _windowed(lm, cond, keys, plan, recorded=None, programs=None):
    """`windows.extend` over the real decoder; `recorded` collects (keys, prompt, output) of each continuation,
    `programs` the number of compiled decoder programs after each."""
    model, params = lm

    continuation = windows.continuation(model, params, cond, STEPS, window=plan.window)

    def generate_window(window_keys, prompt):
        out = continuation(window_keys, prompt)
        if recorded is not None:
            recorded.append((window_keys, prompt, out))
        if programs is not None:
            programs.append(decoding._generate._cache_size())
        return out

    first = generate_codes(model, params, cond, keys, STEPS, length=plan.window)
    return windows.extend(first, generate_window, keys, plan), first


@pytest.mark.parametrize(
    "total,window,stride,expected_windows",
    [(24, 24, 12, 1), (10, 24, 12, 1), (25, 24, 12, 2), (36, 24, 12, 2), (37, 24, 12, 3), (6000, 498, 249, 24)],
)
def test_plan_covers_the_output_exactly_once(total, window, stride, expected_windows):
    plan = WindowPlan(total=total, window=window, stride=stride)
    assert plan.num_windows == expected_windows
    assert sum(plan.kept(j) for j in range(plan.num_windows)) == total
    assert all(0 < plan.kept(j) <= (window if j == 0 else stride) for j in range(plan.num_windows))
    covered = 0  # window j's new frames start where the output so far ends
    for j in range(plan.num_windows):
        new_from = plan.start(j) + (0 if j == 0 else plan.context)
        assert new_from == covered
        covered += plan.kept(j)


def test_plan_rejects_a_stride_without_context():
    for stride in (0, 24, 30):
        with pytest.raises(ValueError, match=f"extend stride of {stride} frames: expected between 1 and 23"):
            WindowPlan(total=100, window=24, stride=stride)


@pytest.mark.parametrize("total,stride", [(61, 9), (50, 20)])
def test_windows_continue_their_predecessor_bit_exactly(lm, total, stride):
    plan = WindowPlan(total=total, window=WINDOW, stride=stride)
    cond, keys = _conditioning(2), jax.random.split(jax.random.key(1), 2)
    recorded = []
    programs = []  # decoder programs compiled so far, at each continuation window
    codes, first = _windowed(lm, cond, keys, plan, recorded, programs)
    codes = np.asarray(codes)
    assert codes.shape == (2, 4, total) and codes.max() < CONFIG.card
    assert len(recorded) == plan.num_windows - 1 >= 2
    # Today's single-window generation is the first window, unchanged.
    np.testing.assert_array_equal(codes[..., :WINDOW], np.asarray(first))
    previous = np.asarray(first)
    for j, (window_keys, prompt, out) in enumerate(recorded, start=1):
        out = np.asarray(out)
        np.testing.assert_array_equal(np.asarray(prompt), previous[..., stride:])  # the last `context` frames
        np.testing.assert_array_equal(out[..., : plan.context], previous[..., stride:])  # kept bit for bit
        new = plan.start(j) + plan.context
        np.testing.assert_array_equal(
            codes[..., new : new + plan.kept(j)], out[..., plan.context :][..., : plan.kept(j)]
        )
        assert np.mean(out[..., plan.context :] != previous[..., :stride]) > 0.5  # new music, not a copy
        expected_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, windows.WINDOW_STREAM), j))(keys)
        np.testing.assert_array_equal(jax.random.key_data(window_keys), jax.random.key_data(expected_keys))
        previous = out
    # Every continuation window runs the program the first continuation compiled (or found cached).
    assert len(set(programs)) == 1


def test_a_row_of_a_windowed_generation_depends_only_on_its_own_key(lm):
    plan = WindowPlan(total=50, window=WINDOW, stride=10)
    cond = _conditioning(2)  # the batch size of the test above: its programs are reused
    keys = jax.random.split(jax.random.key(7), 2)
    batch = np.asarray(_windowed(lm, cond, keys, plan)[0])
    alone = np.asarray(_windowed(lm, TextConditioning(cond.states[1:2], cond.mask[1:2]), keys[1:2], plan)[0])
    np.testing.assert_array_equal(alone[0], batch[1])
    assert np.mean(batch[0] != batch[1]) > 0.5


# ----------------------------------------------------------------------------------------------------------------
# EnCodec decoding of long codes
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def codec():
    config = EncodecConfig.from_config(get_config("size=tiny").codec)
    t = np.arange(32000 * 4) / 32000
    calibration = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.random.default_rng(0).normal(size=t.size)
    return config, encodec.init_encodec(config, 0, calibration.astype(np.float32)[None, None])


def test_long_decode_matches_whole_decode_and_its_memory_does_not_grow(codec):
    config, params = codec
    chunk, context = 100, 25
    rng = np.random.default_rng(1)
    short = rng.integers(0, config.card, (2, config.n_q, chunk + 2 * context)).astype(np.int32)
    np.testing.assert_array_equal(  # up to one window: the plain decoder, bit for bit
        np.asarray(encodec.decode_long(config, params, short, chunk_frames=chunk, context_frames=context)),
        np.asarray(encodec.decode(config, params, short)),
    )
    memory = {}
    for length in (470, 940):
        codes = rng.integers(0, config.card, (2, config.n_q, length)).astype(np.int32)
        whole = np.asarray(encodec.decode(config, params, codes))
        before = encodec._decode_core._cache_size()
        long = np.asarray(encodec.decode_long(config, params, codes, chunk_frames=chunk, context_frames=context))
        assert long.shape == whole.shape == (2, 1, length * config.hop_length)
        np.testing.assert_allclose(long, whole, atol=1e-5 * np.abs(whole).max())  # context hides the window edges
        assert encodec._decode_core._cache_size() - before <= 1  # one window program, whatever the length
        args = (config, params, codes, np.int32(0), np.int32(0), chunk + 2 * context, chunk)
        window_bytes = encodec._decode_core.lower(*args).compile().memory_analysis().temp_size_in_bytes
        whole_bytes = encodec.decode.lower(config, params, codes).compile().memory_analysis().temp_size_in_bytes
        memory[length] = window_bytes, whole_bytes
    (window_a, whole_a), (window_b, whole_b) = memory[470], memory[940]
    assert window_a == window_b  # the window program's scratch memory is independent of the length
    assert whole_b > 1.8 * whole_a and window_b < whole_a / 2  # whole-sequence decoding grows with it
