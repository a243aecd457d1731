"""Python generation API (`magnet_jax.api.MAGNeT`) on a tiny locally created model.

The model is complete and real on disk: a random T5 + sentencepiece tokenizer dir, a tiny EnCodec in the transformers
layout with codebooks fitted on synthetic music, and an untrained tiny LM saved with `pretrained.save_pretrained`.
The mesh is the 8 simulated CPU devices of conftest.py, rows sharded data parallel.
"""

import json
import math
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soxr
import torch

from configs.magnet import get_config
from data_pipelines.make_tiny_assets import calibration_audio
from magnet_jax import api, train
from magnet_jax.api import MAGNeT
from magnet_jax.checkpoints import sources
from magnet_jax.checkpoints.encodec_weights import load_encodec
from magnet_jax.checkpoints.lm_weights import export_audiocraft
from magnet_jax.checkpoints.pretrained import load_pretrained
from magnet_jax.fileio import WeightsError, flatten_dict
from magnet_jax.generation import hybrid
from magnet_jax.generation.musicgen import generate_ar
from magnet_jax.models import conditioner, encodec
from magnet_jax.models.encodec import EncodecConfig
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params
from magnet_jax.training import checkpointing, train_lib

STEPS = [2, 2, 2, 2]  # decoding steps per codebook: enough to exercise every stage, cheap to compile


@pytest.fixture(scope="module")
def model(tiny):
    m = MAGNeT.from_pretrained(str(tiny["lm"]))
    m.set_generation_params(decoding_steps=STEPS)
    return m


def test_tiny_codec_on_disk_is_the_codec_that_was_created(tiny):
    config, loaded = load_encodec(tiny["codec"])
    assert config == EncodecConfig.from_config(get_config("size=tiny").codec)
    calibration = calibration_audio(tiny["root"] / "corpus", 32000)
    created = encodec.init_encodec(config, 0, calibration)  # what make_assets wrote (same seed and audio)
    for path, value in flatten_dict(created).items():
        np.testing.assert_array_equal(np.asarray(flatten_dict(loaded)[path]), np.asarray(value), err_msg=path)
    codes = np.asarray(encodec.encode(config, loaded, calibration))
    assert all(len(np.unique(codes[:, k])) > config.card // 4 for k in range(config.n_q))  # fitted, not collapsed


def test_generate_returns_codes_and_audio_of_the_segment_length(model):
    out = model.generate(["a calm piano piece", None, "fast techno with drums"], seed=0)
    frames = 48  # 1 s at 50 Hz, trimmed to whole 3-frame spans ('nonoverlap')
    assert model.num_frames == frames
    assert out.codes.shape == (3, 4, frames) and out.codes.dtype == np.int32
    assert out.audio.shape == (3, 1, frames * 640) and out.audio.dtype == np.float32
    assert out.codes.min() >= 0 and out.codes.max() < 64
    # sampled, not degenerate: no row of a codebook is (nearly) one code, and the three rows differ (the random
    # model's 2-step stages give 6-30 distinct codes in 48 frames)
    assert all(len(np.unique(row)) > 4 for row in out.codes.reshape(-1, frames))
    assert all((out.codes[i] != out.codes[j]).mean() > 0.5 for i, j in ((0, 1), (0, 2), (1, 2)))
    assert np.all(np.isfinite(out.audio)) and np.abs(out.audio).max() > 1e-3
    np.testing.assert_allclose(  # the audio is the codec's decoding of the returned codes
        out.audio, np.asarray(encodec.decode(model.codec_config, model.codec_params, out.codes)), atol=1e-5
    )


def test_a_row_depends_only_on_its_description_and_seed(model):
    batch = model.generate(["a calm piano piece", "fast techno with drums", None], seed=7)
    alone = model.generate(["a calm piano piece"], seed=7)
    np.testing.assert_array_equal(alone.codes[0], batch.codes[0])
    np.testing.assert_allclose(alone.audio[0], batch.audio[0], atol=1e-6)
    other_seed = model.generate(["a calm piano piece"], seed=8)
    assert not np.array_equal(other_seed.codes[0], batch.codes[0])


def test_rows_are_sharded_over_every_device(model):
    rows = model.batch_multiple
    assert rows == len(jax.devices()) == 8
    codes = model.generate_codes(["a"] * rows, api.row_keys([(0, i) for i in range(rows)]))
    assert codes.sharding.shard_shape(codes.shape) == (1, 4, 48)  # one row per device
    assert {s.device for s in codes.addressable_shards} == set(jax.devices())


def test_continuation_resamples_encodes_and_keeps_the_prompt(model):
    rng = np.random.default_rng(0)
    prompt = (0.2 * rng.standard_normal((2, 2, 11025))).astype(np.float32)  # 0.25 s of stereo at 44.1 kHz
    out = model.generate_continuation(prompt, 44100, ["jazz trio", None], seed=3)

    mono = np.stack([soxr.resample(p.mean(axis=0), 44100, 32000, quality="VHQ") for p in prompt])[:, None]
    expected = np.asarray(encodec.encode(model.codec_config, model.codec_params, mono.astype(np.float32)))
    assert expected.shape[-1] == math.ceil(mono.shape[-1] / 640) == 13
    np.testing.assert_array_equal(out.codes[..., :13], expected)  # prompt codes in every codebook, unchanged
    assert out.codes.shape == (2, 4, 48)
    assert not np.array_equal(out.codes[..., 13:26], np.broadcast_to(expected[..., :13], (2, 4, 13)))


def test_continuation_prompt_must_be_shorter_than_the_output(model):
    with pytest.raises(ValueError, match="fewer than the 48 generated frames"):
        model.generate_continuation(np.zeros((1, 32000), np.float32), 32000, ["x"])
    with pytest.raises(ValueError, match=r"2 descriptions for 1 prompts"):
        model.generate_continuation(np.zeros((1, 1, 3200), np.float32), 32000, ["x", "y"])


def test_a_string_is_one_description_and_other_types_are_refused(model):
    one = model.generate("a calm piano piece", seed=3)
    assert one.codes.shape[0] == 1
    np.testing.assert_array_equal(one.codes, model.generate(["a calm piano piece"], seed=3).codes)
    with pytest.raises(ValueError, match=r"descriptions\[0\]=42: expected a string or None, got int"):
        model.generate([42])
    with pytest.raises(ValueError, match="descriptions: expected a string or a list"):
        model.generate(None)


def test_continuation_refuses_a_non_finite_prompt(model):
    prompt = np.zeros((1, 1, 8000), np.float32)
    prompt[0, 0, 10] = np.nan
    with pytest.raises(ValueError, match="prompt: 1 samples are NaN or infinite"):
        model.generate_continuation(prompt, 32000, ["a calm piano piece"])
    with pytest.raises(ValueError, match="descriptions\\[0\\]=b'x'"):
        model.generate_continuation(np.zeros((1, 8000), np.float32), 32000, [b"x"])


def test_set_generation_params_validates_names_and_values(model):
    before = model.generation_params
    with pytest.raises(ValueError, match="unknown generation parameter.*max_cfg_coef"):
        model.set_generation_params(max_cfg_coef=3.0)
    with pytest.raises(ValueError, match="duration=0: expected a positive number of seconds"):
        model.set_generation_params(duration=0)
    for stride in (0.0, 1.0):  # no new frames, or no context left (the window is 48 frames)
        with pytest.raises(ValueError, match=f"extend_stride={stride}: expected between .* of 48 frames"):
            model.set_generation_params(extend_stride=stride)
    with pytest.raises(ValueError, match="decoding_steps=.*4 entries"):
        model.set_generation_params(decoding_steps=[2, 2])
    with pytest.raises(ValueError, match="span_arrangement"):
        model.set_generation_params(span_arrangement="zigzag")
    assert model.generation_params == before  # a rejected call changes nothing
    model.set_generation_params(duration=0.5)
    assert model.num_frames == 24
    model.set_generation_params(duration=1.0)


def test_windowed_generation_has_the_exact_length_and_starts_with_todays_window(model):
    texts = ["a calm piano piece", "fast techno with drums"]
    today = model.generate(texts, seed=3)
    within = model.generate(texts, seed=3, duration=1.0, extend_stride=0.3)  # one window: today's output
    np.testing.assert_array_equal(within.codes, today.codes)
    np.testing.assert_array_equal(within.audio, today.audio)
    for duration, stride, frames in ((2.6, 0.5, 129), (1.9, 0.8, 93)):  # 5 and 3 windows of 48 frames
        out = model.generate(texts, seed=3, duration=duration, extend_stride=stride)
        assert out.codes.shape == (2, 4, frames) and out.audio.shape == (2, 1, frames * 640)
        np.testing.assert_array_equal(out.codes[..., :48], today.codes)  # the first window is today's
        later = out.codes[..., 48:]
        assert np.mean(later != out.codes[..., : later.shape[-1]]) > 0.5  # new frames, not the first window again
        np.testing.assert_allclose(
            out.audio, np.asarray(encodec.decode(model.codec_config, model.codec_params, out.codes)), atol=1e-5
        )
    alone = model.generate(texts[:1], seed=3, duration=1.9, extend_stride=0.8)
    np.testing.assert_array_equal(alone.codes[0], out.codes[0])  # row keys hold across windows
    assert (model.duration, model.generation_params["extend_stride"]) == (1.0, 0.5)  # per call only


def test_windowed_continuation_keeps_the_audio_prompt(model):
    prompt = (0.2 * np.random.default_rng(1).standard_normal((1, 1, 6400))).astype(np.float32)  # 10 frames
    model.set_generation_params(duration=1.5)
    try:
        out = model.generate_continuation(prompt, 32000, ["jazz trio"], seed=1)
    finally:
        model.set_generation_params(duration=1.0)
    expected = np.asarray(encodec.encode(model.codec_config, model.codec_params, prompt))
    assert out.codes.shape == (1, 4, 75)
    np.testing.assert_array_equal(out.codes[..., :10], expected)


def test_defaults_come_from_the_checkpoint_config(tiny, model):
    stored = json.loads((tiny["lm"] / "config.json").read_text())["generate"]
    params = model.generation_params
    assert params["duration"] == 1.0  # the model's training segment
    assert {k: params[k] for k in ("temperature", "top_p", "max_cfg", "min_cfg", "span_arrangement")} == {
        k: stored[k] for k in ("temperature", "top_p", "max_cfg", "min_cfg", "span_arrangement")
    }


def test_audiocraft_format_directory_generates_like_the_converted_checkpoint(tiny, model, tmp_path):
    config, params = load_pretrained(tiny["lm"])
    export_audiocraft(tmp_path / "ac", params, config)
    torch.save({"pretrained": str(tiny["codec"])}, tmp_path / "ac" / "compression_state_dict.bin")
    other = MAGNeT.from_pretrained(str(tmp_path / "ac"), t5=str(tiny["t5"]))
    assert other.codec_source == str(tiny["codec"])
    other.set_generation_params(decoding_steps=STEPS)
    np.testing.assert_array_equal(
        other.generate(["a calm piano piece"], seed=4).codes, model.generate(["a calm piano piece"], seed=4).codes
    )


def _train_config(tiny, objective="magnet"):
    c = get_config(f"size=tiny,duration=1,objective={objective}")
    c.conditioner.t5 = str(tiny["t5"])
    c.codec.source = str(tiny["codec"])
    return c


def test_training_workdir_gives_its_newest_checkpoint_ema_params_then_its_export(tiny, tmp_path):
    config, workdir = _train_config(tiny), tmp_path / "run"
    state = train_lib.create_train_state(config, jax.random.key(1))
    state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.params), step=state.step + 5)
    workdir.mkdir()
    train.write_config(config, str(workdir))
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
    ckpt.save(5, state, None, config, force=True)
    ckpt.close()

    loaded_config, params = sources.load_lm(str(workdir))
    assert loaded_config["provenance"]["step"] == 5 and loaded_config["codec"]["source"] == str(tiny["codec"])
    assert loaded_config["objective"] == "magnet" and loaded_config["generate"]["span_len"] == 3
    for path, value in flatten_dict(jax.device_get(state.ema_params)).items():
        np.testing.assert_array_equal(flatten_dict(params)[path], value, err_msg=path)
    assert MAGNeT(loaded_config, params, api.make_settings()).segment_seconds == 1.0

    train_lib.export_params(state.replace(ema_params=state.params), str(workdir / "export"), config)
    exported_config, exported = sources.load_lm(str(workdir))
    assert exported_config["provenance"]["source"] == "magnet_jax training"
    assert {k: exported_config[k] for k in ("objective", "generate")} == {
        k: loaded_config[k] for k in ("objective", "generate")
    }
    for path, value in flatten_dict(jax.device_get(state.params)).items():
        np.testing.assert_array_equal(flatten_dict(exported)[path], value, err_msg=path)

    # The run is continued past its export (a checkpoint of step 8, no new export yet): the newer checkpoint wins.
    ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
    ckpt.save(8, state.replace(step=state.step + 3), None, config, force=True)
    ckpt.close()
    newer_config, newer = sources.load_lm(str(workdir))
    assert newer_config["provenance"]["step"] == 8
    for path, value in flatten_dict(jax.device_get(state.ema_params)).items():
        np.testing.assert_array_equal(flatten_dict(newer)[path], value, err_msg=path)


@pytest.mark.parametrize(
    "source,fragment",
    [("facebook/magnet-small-10secs", "HF_HUB_OFFLINE is set"), ("/nonexistent/model_dir", "/nonexistent/model_dir")],
)
def test_unavailable_source_is_a_one_line_error(source, fragment):
    with pytest.raises(WeightsError, match=fragment) as e:
        MAGNeT.from_pretrained(source)
    assert "\n" not in str(e.value)


def test_unknown_setting_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown setting.*temperature"):
        MAGNeT.from_pretrained(str(tiny["lm"]), temperature=2.0)


# ------------------------------------------------------------------------------------------------------------
# Rescoring and the composition-mode hybrid with a MusicGen model in the audiocraft release format


def write_tiny_musicgen(directory, tiny, *, card=64, seed=2):
    """A tiny random causal MusicGen (same codebooks and T5 width as the tiny MAGNeT) exported as an audiocraft
    `state_dict.bin` directory, heads sharpened so its choices are not float noise."""
    config = LMConfig(dim=32, num_heads=4, num_layers=2, card=card, n_q=4, cond_dim=32, causal=True)
    params = nn.meta.unbox(init_params(LanguageModel(config), jax.random.key(seed)))
    params = {**params, **{f"head_{k}": {"kernel": params[f"head_{k}"]["kernel"] * 8} for k in range(4)}}
    export_audiocraft(
        directory,
        params,
        {
            "model": config.to_dict(),
            "conditioner": {"t5": str(tiny["t5"]), "t5_dim": 32},
            "codec": {"source": str(tiny["codec"])},
            "segment_seconds": 1.0,
            "generate": {},
        },
    )
    return str(directory)


@pytest.fixture(scope="module")
def musicgen(tiny):
    return write_tiny_musicgen(tiny["root"] / "musicgen", tiny)


@pytest.fixture(scope="module")
def with_musicgen(tiny, musicgen):
    m = MAGNeT.from_pretrained(str(tiny["lm"]), rescorer=musicgen, ar_model=musicgen)
    m.set_generation_params(decoding_steps=STEPS)
    return m


def test_one_musicgen_source_serves_as_rescorer_and_ar_model(with_musicgen):
    assert with_musicgen.rescorer is with_musicgen.ar_model  # loaded once
    rescorer_model, params = with_musicgen.rescorer
    assert rescorer_model.config.causal and rescorer_model.config.card == 64
    assert {s.device for leaf in jax.tree.leaves(params) for s in leaf.addressable_shards} == set(jax.devices())


def test_rescoring_changes_the_remasking_and_weight_one_is_plain_decoding(with_musicgen, model):
    texts = ["a calm piano piece", "fast techno with drums"]
    plain = model.generate(texts, seed=5).codes
    with_musicgen.set_generation_params(rescore_weight=1.0)
    np.testing.assert_array_equal(with_musicgen.generate(texts, seed=5).codes, plain)
    steps = [6, 4, 4, 4]  # enough steps for the re-masking choices to matter
    model.set_generation_params(decoding_steps=steps)
    with_musicgen.set_generation_params(rescore_weight=0.3, decoding_steps=steps)
    try:
        plain = model.generate(texts, seed=5).codes
        rescored = with_musicgen.generate(texts, seed=5)
    finally:
        model.set_generation_params(decoding_steps=STEPS)
        with_musicgen.set_generation_params(rescore_weight=1.0, decoding_steps=STEPS)
    assert rescored.codes.shape == (2, 4, 48) and rescored.codes.max() < 64
    assert np.mean(rescored.codes != plain) > 0.2


def test_hybrid_prefix_is_the_musicgen_greedy_generation_then_frozen(with_musicgen):
    m = with_musicgen
    m.set_generation_params(ar_use_sampling=False, rescore_weight=1.0)
    before = m.generation_params
    out = m.generate(["jazz trio"], seed=2, prefix_seconds=0.2)  # 10 frames by MusicGen, 38 by MAGNeT
    assert m.generation_params == before  # the keyword applies to this call only

    cond = _text_conditioning(m, ["jazz trio"])
    ar_model, ar_params = m.ar_model
    mask = np.asarray(cond.mask)
    null = np.zeros_like(mask)
    condition = ar_model.apply(
        {"params": ar_params},
        jnp.concatenate([cond.states, jnp.zeros_like(cond.states)]),
        np.concatenate([mask, null]),
        method=ar_model.project_condition,
    )
    expected = generate_ar(
        ar_model,
        ar_params,
        condition,
        jnp.concatenate([cond.attend, cond.attend]),
        jax.random.key(0),
        length=10,
        cfg_coef=3.0,
    )
    assert len(np.unique(np.asarray(expected))) > 5
    np.testing.assert_array_equal(out.codes[..., :10], np.asarray(expected))
    assert out.codes.shape == (1, 4, 48) and len(np.unique(out.codes[..., 10:])) > 10

    # An audio prompt shorter than the prefix: MusicGen continues it up to the prefix, MAGNeT finishes.
    wav = (0.2 * np.random.default_rng(1).standard_normal((1, 1, 3200))).astype(np.float32)  # 5 frames
    m.set_generation_params(prefix_seconds=0.2)
    try:
        cont = m.generate_continuation(wav, 32000, ["jazz trio"], seed=2)
    finally:
        m.set_generation_params(prefix_seconds=0.0, ar_use_sampling=True)
    prompt_codes = m.encode_audio(wav, 32000)
    forced = generate_ar(
        ar_model,
        ar_params,
        condition,
        jnp.concatenate([cond.attend, cond.attend]),
        jax.random.key(0),
        length=10,
        cfg_coef=3.0,
        prompt=jnp.asarray(prompt_codes),
    )
    np.testing.assert_array_equal(cont.codes[..., :5], prompt_codes)
    np.testing.assert_array_equal(cont.codes[..., :10], np.asarray(forced))


def _text_conditioning(m: MAGNeT, texts):
    """The `TextConditioning` the API computes for `texts` (unsharded)."""
    tokens = m.tokenizer(texts)
    extra = ((0, 0), (0, m.text_length - tokens["ids"].shape[1]))
    ids, mask = np.pad(tokens["ids"], extra, constant_values=m.tokenizer.pad_id), np.pad(tokens["mask"], extra)
    return conditioner.row_conditioning(m.t5_config, m.tokenizer.pad_id, m.t5_params, ids, mask)


def test_companion_models_are_checked(tiny, model, tmp_path):
    with pytest.raises(WeightsError, match="rescorer .*non-causal"):
        MAGNeT.from_pretrained(str(tiny["lm"]), rescorer=str(tiny["lm"]))
    other = write_tiny_musicgen(tmp_path / "card32", tiny, card=32)
    with pytest.raises(WeightsError, match="ar_model .*card=32 but the MAGNeT model has card=64"):
        MAGNeT.from_pretrained(str(tiny["lm"]), ar_model=other)
    with pytest.raises(ValueError, match="prefix_seconds=0.2: needs an AR model"):
        model.set_generation_params(prefix_seconds=0.2)
    with pytest.raises(ValueError, match="rescore_weight=-0.1"):
        model.set_generation_params(rescore_weight=-0.1)


# ------------------------------------------------------------------------------------------------------------
# Single-model Hybrid-MAGNeT (train.objective="hybrid"): exported by training, generated through the API


@pytest.fixture(scope="module")
def hybrid_source(tiny):
    """An untrained tiny Hybrid-MAGNeT exported as training exports it, trained span length 2 (not the default 3)."""
    config = _train_config(tiny, objective="hybrid")
    config.masking.span_len = 2
    train_lib.export_params(
        train_lib.create_train_state(config, jax.random.key(3)), str(tiny["root"] / "hybrid"), config
    )
    return tiny["root"] / "hybrid"


@pytest.fixture(scope="module")
def hybrid_model(hybrid_source):
    m = MAGNeT.from_pretrained(str(hybrid_source))
    m.set_generation_params(decoding_steps=STEPS)
    return m


def test_export_records_the_objective_and_the_trained_span_len(tiny, hybrid_source, hybrid_model, model):
    saved = json.loads((hybrid_source / "config.json").read_text())
    assert saved["objective"] == "hybrid" and saved["generate"]["span_len"] == 2
    assert hybrid_model.objective.name == "hybrid" and hybrid_model.decode_params.span_len == 2
    assert hybrid_model.num_frames == 50  # 1 s at 50 Hz in whole 2-frame spans (48 with the default 3)
    assert "objective" not in json.loads((tiny["lm"] / "config.json").read_text()) and model.objective.name == "magnet"


def test_hybrid_model_generates_its_own_prefix_as_generate_hybrid_codes_with_the_row_keys(hybrid_model):
    m, texts = hybrid_model, ["jazz trio", "fast techno with drums"]
    before = m.generation_params
    out = m.generate(texts, seed=2, prefix_seconds=0.2)  # 10 frames autoregressively, then MAGNeT decoding
    assert m.generation_params == before
    expected = np.asarray(
        hybrid.generate_hybrid_codes(
            m.model,
            m.lm_params,
            _text_conditioning(m, texts),
            jnp.asarray(api.row_keys([(2, 0), (2, 1)])),
            m.decode_params,
            length=50,
            prefix_frames=10,
            ar_sample=m.prefix_params.sample_fn(64),
            ar_cfg=3.0,
        )
    )
    np.testing.assert_array_equal(out.codes, expected)
    assert out.codes.shape == (2, 4, 50) and out.codes.max() < 64
    assert all(len(np.unique(row)) > 8 for row in out.codes.reshape(-1, 50))  # sampled, not degenerate
    assert not np.array_equal(out.codes[0, :, :6], out.codes[1, :, :6])  # each row its own AR prefix
    alone = m.generate(texts[:1], seed=2, prefix_seconds=0.2)  # row keys: a row does not depend on the batch
    np.testing.assert_array_equal(alone.codes[0], out.codes[0])


def test_hybrid_model_takes_no_companion_model_nor_audio_prompt(hybrid_source, hybrid_model, musicgen):
    for setting in ("rescorer", "ar_model"):
        with pytest.raises(WeightsError, match="Hybrid-MAGNeT model .*rescorer and ar_model are not supported"):
            MAGNeT.from_pretrained(str(hybrid_source), **{setting: musicgen})
    with pytest.raises(ValueError, match="audio prompts .*not supported with a Hybrid-MAGNeT model"):
        hybrid_model.generate_continuation(np.zeros((1, 1, 3200), np.float32), 32000, ["jazz trio"])
    with pytest.raises(ValueError, match="prefix_seconds=1.5: expected between 1 and 50 of the 50 generated"):
        hybrid_model.set_generation_params(prefix_seconds=1.5)
    with pytest.raises(ValueError, match="duration=2.5: longer than the model's training segment .*Hybrid-MAGNeT"):
        hybrid_model.set_generation_params(duration=2.5)


def test_unknown_objective_in_config_json_is_a_one_line_error(hybrid_source, tmp_path):
    shutil.copytree(hybrid_source, tmp_path / "model")
    file = tmp_path / "model" / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "objective": "maskgit"}))
    with pytest.raises(
        WeightsError, match=re.escape(f"{file}: objective='maskgit': expected one of magnet, hybrid")
    ) as e:
        MAGNeT.from_pretrained(str(tmp_path / "model"))
    assert "\n" not in str(e.value)
