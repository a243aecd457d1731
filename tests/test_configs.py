"""configs/magnet.py presets, derived fields and error handling."""

import pytest

from configs.magnet import get_config
from magnet_jax.models.lm import LMConfig, count_params


@pytest.mark.parametrize(
    "size,dims", [("small", (1024, 16, 24)), ("medium", (1536, 24, 48)), ("large", (2048, 32, 48))]
)
def test_size_presets_set_reference_dimensions(size, dims):
    c = get_config(f"size={size}")
    assert (c.model.dim, c.model.num_heads, c.model.num_layers) == dims


def test_duration_preset_sets_segment_length_and_first_stage_steps():
    c10, c30 = get_config("size=small,duration=10"), get_config("size=small,duration=30")
    assert (c10.data.seq_len, c30.data.seq_len) == (500, 1500)
    assert list(c10.generate.decoding_steps) == [20, 10, 10, 10]
    assert list(c30.generate.decoding_steps) == [60, 10, 10, 10]
    assert c30.generate.duration == 30.0


def test_sound_preset_uses_16khz_codec_and_t5_large():
    c = get_config("size=medium,task=sound")
    assert (c.codec.sample_rate, list(c.codec.ratios), c.codec.frame_rate) == (16000, [8, 5, 4, 2], 50)
    assert (c.conditioner.t5, c.conditioner.t5_dim, c.model.cond_dim) == ("t5-large", 1024, 1024)
    assert (c.generate.temperature, c.generate.top_p, c.generate.max_cfg) == (3.5, 0.8, 20.0)
    assert c.conditioner.cfg_dropout == 0.1


def test_derived_fields_follow_overrides():
    c = get_config("size=tiny")
    c.data.segment_seconds = 4.0
    c.codec.card = 128
    assert c.data.seq_len == 4 * c.codec.frame_rate
    assert c.model.card == 128


def test_model_section_builds_lm_config_with_reference_parameter_count():
    c = get_config("size=small")
    assert abs(count_params(LMConfig.from_config(c.model)) / 1e6 - 420.4) < 0.05


@pytest.mark.parametrize(
    "arg,match",
    [
        ("size=huge", "size='huge'"),
        ("sise=small", "unknown preset option 'sise'"),
        ("duration=ten", "expected float"),
        ("task=speech", "task='speech'"),
    ],
)
def test_bad_preset_string_is_a_clear_error(arg, match):
    with pytest.raises(ValueError, match=match):
        get_config(arg)


def test_locked_config_rejects_unknown_field_and_wrong_type():
    c = get_config("size=tiny")
    c.lock()
    with pytest.raises(AttributeError):
        c.model.dimm = 3
    with pytest.raises(TypeError):
        c.model.dim = "wide"


def test_fractional_duration_works_in_both_presets():
    from configs import generate

    assert get_config("size=tiny,duration=2.5").data.seq_len == 125
    assert generate.get_config("source=x,duration=2.5").generate.duration == 2.5
