"""EnCodec in Flax: parity with transformers' and audiocraft's PyTorch EnCodec, weight loading, chunked encoding.

The PyTorch references get non-degenerate codebooks first (transformers initialises them to zeros, which would make
every code 0 and code parity trivial); every parity test asserts the codes spread over the codebooks.
"""

import dataclasses
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from configs.magnet import get_config
from magnet_jax.checkpoints import encodec_weights
from magnet_jax.checkpoints.encodec_weights import load_encodec, params_from_state_dict
from magnet_jax.fileio import WeightsError
from magnet_jax.models import encodec
from magnet_jax.models.encodec import EncodecConfig

SR = 32000
# Tiny transformers config (docs/design.md §11); bandwidth 0.8 gives 4 codebooks of 16 entries.
TINY_HF = dict(
    sampling_rate=SR,
    audio_channels=1,
    normalize=False,
    chunk_length_s=None,
    overlap=None,
    target_bandwidths=[0.8],
    codebook_size=16,
    codebook_dim=16,
    hidden_size=16,
    num_filters=4,
    num_residual_layers=1,
    upsampling_ratios=[8, 5, 4, 4],
    norm_type="weight_norm",
    use_causal_conv=False,
    compress=2,
    num_lstm_layers=2,
    trim_right_ratio=1.0,
)
# facebook/encodec_32khz (transformers' convert_encodec_checkpoint_to_pytorch.py); the rest are config defaults.
REAL_32KHZ_HF = dict(
    sampling_rate=SR,
    upsampling_ratios=[8, 5, 4, 4],
    target_bandwidths=[2.2],
    num_filters=64,
    codebook_size=2048,
    use_causal_conv=False,
    normalize=False,
    use_conv_shortcut=False,
)
# audiocraft config/model/encodec/default.yaml, scaled down (xp.cfg of a compression_state_dict.bin).
TINY_AUDIOCRAFT_XP = """
compression_model: encodec
sample_rate: 32000
channels: 1
encodec: {autoencoder: seanet, quantizer: rvq, sample_rate: '${sample_rate}', channels: '${channels}',
          causal: false, renormalize: false}
seanet:
  dimension: 16
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 4
  n_residual_layers: 1
  ratios: [8, 5, 4, 4]
  activation: ELU
  activation_params: {alpha: 1.0}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 2
  disable_norm_outer_blocks: 0
  decoder: {trim_right_ratio: 1.0, final_activation: null, final_activation_params: null}
  encoder: {}
rvq: {n_q: 4, q_dropout: false, bins: 32, decay: 0.99, kmeans_init: true, kmeans_iters: 50,
      threshold_ema_dead_code: 2, orthogonal_reg_weight: 0.0, orthogonal_reg_active_codes_only: false}
"""


def audio(batch: int, samples: int, seed: int) -> np.ndarray:
    """Tones plus noise, [B, 1, N] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    freqs = rng.uniform(80, 2000, size=(batch, 1, 1, 3))
    tones = np.sin(2 * np.pi * freqs * t[None, None, :, None]).sum(-1) / 3
    return (0.3 * tones + 0.05 * rng.standard_normal((batch, 1, samples))).astype(np.float32)


def relative_error(ours, reference) -> float:
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def assert_codes_spread(codes: np.ndarray, min_unique: int):
    for k in range(codes.shape[1]):
        assert len(np.unique(codes[:, k])) >= min_unique, f"codebook {k} uses too few entries: {codes[:, k]}"


def centered_latent_frames(encoder: torch.nn.Module, last_conv: torch.nn.Conv1d, wav: np.ndarray) -> np.ndarray:
    """Latent frames [B·T, D] of `wav`, after shifting the encoder's last bias so they have zero mean.

    Random encoders give latents dominated by a constant offset; nearest-codebook decisions then hinge on
    cancellation in ‖x‖² - 2x·e + ‖e‖² at the float32 rounding level, so centring keeps the code parity meaningful.
    """
    with torch.no_grad():
        frames = encoder(torch.from_numpy(wav)).permute(0, 2, 1).reshape(-1, last_conv.out_channels)
        last_conv.bias -= frames.mean(0)
        return (frames - frames.mean(0)).numpy()


def min_decision_margin(latent_frames: np.ndarray, codebooks: np.ndarray) -> float:
    """Smallest gap between the best and second-best codebook distance over all frames and levels, relative to the
    distance scale (float64; latents [N, D] from the reference, codebooks [K, card, D])."""
    residual = np.asarray(latent_frames, np.float64)
    margin = np.inf
    for book in np.asarray(codebooks, np.float64):
        dist = squared_distances(residual, book)
        best, second = np.sort(dist, axis=1)[:, :2].T
        scale = (residual**2).sum(1) + (book**2).sum(1).mean()
        margin = min(margin, float(((second - best) / scale).min()))
        residual = residual - book[dist.argmin(1)]
    return margin


def squared_distances(x: np.ndarray, book: np.ndarray) -> np.ndarray:
    """‖x_i - e_j‖² [N, card] in float64 (direct form: no cancellation at this precision)."""
    return np.maximum((x**2).sum(1, keepdims=True) - 2 * x @ book.T + (book**2).sum(1), 0.0)


def reference_encode(model: torch.nn.Module, wav: np.ndarray, **kwargs):
    """Runs the reference's public `encode`; returns (its output, the encoder's latent frames [B·T, D]),
    the latents captured with a forward hook so the encoder runs once."""
    captured = []
    hook = model.encoder.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        with torch.no_grad():
            out = model.encode(torch.from_numpy(wav), **kwargs)
    finally:
        hook.remove()
    (z,) = captured
    return out, z.permute(0, 2, 1).reshape(-1, z.shape[1]).numpy()


def tiny_hf_model(pad_mode: str, seed: int = 3):
    """Tiny transformers EncodecModel with k-means codebooks fitted on calibration audio."""
    torch.manual_seed(seed)
    model = transformers.EncodecModel(transformers.EncodecConfig(**TINY_HF, pad_mode=pad_mode)).eval()
    frames = centered_latent_frames(model.encoder, model.encoder.layers[-1].conv, audio(2, SR, seed=100))
    books = encodec.fit_codebooks(frames, 16, 4, seed=seed)
    with torch.no_grad():
        for layer, book in zip(model.quantizer.layers, books):
            layer.codebook.embed.copy_(torch.from_numpy(book))
    return model


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory):
    """pad mode -> (model, transformers 5 `save_pretrained` dir: parametrizations.* weight-norm names,
    config.json holding only the fields that differ from transformers' defaults)."""
    models = {}
    for pad_mode in ("reflect", "constant"):
        path = tmp_path_factory.mktemp(f"encodec_tiny_hf_{pad_mode}")
        model = tiny_hf_model(pad_mode)
        model.save_pretrained(path)
        models[pad_mode] = model, path
    return models


@pytest.fixture(scope="module")
def tiny_hf(tiny_hf_models):
    return tiny_hf_models["reflect"]


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_hf):
    return tiny_hf[1]


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
def test_codes_match_transformers_encodec_tiny(tiny_hf_models, pad_mode):
    model, path = tiny_hf_models[pad_mode]
    config, params = load_encodec(path)
    assert config.pad_mode == pad_mode and config.n_q == 4 and config.card == 16 and not config.true_skip
    wav = audio(2, 24037, seed=1)  # not a multiple of the hop: exercises the extra right padding

    codes = np.asarray(encodec.encode(config, params, wav))
    out, ref_latents = reference_encode(model, wav, bandwidth=0.8)
    ref_codes = out.audio_codes
    with torch.no_grad():
        ref_wav = model.decode(ref_codes, [None]).audio_values.numpy()
    assert codes.dtype == np.int32 and codes.shape == (2, 4, 38)
    assert_codes_spread(codes, min_unique=8)
    # no near-tie that float32 rounding could flip
    assert min_decision_margin(ref_latents, params["quantizer"]["codebooks"]) > 1e-6
    np.testing.assert_array_equal(codes, ref_codes[0].numpy())

    wav_out = encodec.decode(config, params, codes)
    assert wav_out.shape == ref_wav.shape == (2, 1, 38 * 640)
    assert np.abs(ref_wav).max() > 1e-3
    assert relative_error(wav_out, ref_wav) <= 1e-4


def test_short_audio_matches_transformers_reflect_padding(tiny_hf):
    """700 samples: 2 frames, so the deepest convs pad more than their input (the zero-extended reflect case)."""
    model, path = tiny_hf
    config, params = load_encodec(path)
    wav = audio(2, 700, seed=9)
    codes = np.asarray(encodec.encode(config, params, wav))
    out, ref_latents = reference_encode(model, wav, bandwidth=0.8)
    ref_codes = out.audio_codes
    with torch.no_grad():
        ref_wav = model.decode(ref_codes, [None]).audio_values.numpy()
    assert codes.shape == (2, 4, 2) and len(np.unique(codes)) >= 4
    assert min_decision_margin(ref_latents, params["quantizer"]["codebooks"]) > 1e-6
    np.testing.assert_array_equal(codes, ref_codes[0].numpy())
    assert relative_error(encodec.decode(config, params, codes), ref_wav) <= 1e-4


@pytest.fixture(scope="module")
def real_32khz_model():
    """transformers EncodecModel with the encodec_32khz architecture (reflect padding, the config default that
    the hub file keeps), random weights, Gaussian codebooks.

    Level k's entries are drawn from the mean/std of the level-k residual of the reference's latents, so every
    level has spread-out codes (1 s of audio gives too few frames for k-means over 2048 entries).
    """
    torch.manual_seed(0)
    model = transformers.EncodecModel(transformers.EncodecConfig(**REAL_32KHZ_HF)).eval()
    rng = np.random.default_rng(0)
    residual = centered_latent_frames(model.encoder, model.encoder.layers[-1].conv, audio(1, SR, seed=101))
    residual = residual.astype(np.float64)
    with torch.no_grad():
        for layer in model.quantizer.layers:
            book = residual.mean(0) + residual.std(0) * rng.standard_normal((2048, 128))
            layer.codebook.embed.copy_(torch.from_numpy(book.astype(np.float32)))
            nearest = squared_distances(residual, book).argmin(1)
            residual = residual - book[nearest]
    return model


def test_codes_match_transformers_encodec_32khz_architecture(real_32khz_model):
    """Pad modes are covered on the tiny config, which has the same kernels and strides."""
    model = real_32khz_model
    config = encodec_weights.config_from_hf(model.config.to_dict())
    assert config.pad_mode == "reflect" and config.hop_length == 640
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    params = params_from_state_dict(config, state, layout="transformers", source="encodec_32khz (random)")
    wav = audio(1, SR, seed=2)

    codes = np.asarray(encodec.encode(config, params, wav))
    out, ref_latents = reference_encode(model, wav, bandwidth=2.2)
    ref_codes = out.audio_codes
    with torch.no_grad():
        ref_wav = model.decode(ref_codes, [None]).audio_values.numpy()
    assert codes.shape == (1, 4, 50)
    assert_codes_spread(codes, min_unique=25)
    assert min_decision_margin(ref_latents, params["quantizer"]["codebooks"]) > 1e-6
    np.testing.assert_array_equal(codes, ref_codes[0].numpy())
    assert np.abs(ref_wav).max() > 1e-3
    assert relative_error(encodec.decode(config, params, codes), ref_wav) <= 1e-4


def test_encodec_32khz_config_gives_spec_architecture():
    config = encodec_weights.config_from_hf({"model_type": "encodec", **REAL_32KHZ_HF})
    assert (config.hop_length, config.frame_rate, config.n_q) == (640, 50.0, 4)
    assert (config.card, config.dimension) == (2048, 128)
    assert config.true_skip and config.num_lstm_layers == 2 and config.pad_mode == "reflect"  # transformers default
    shapes = nn.unbox(encodec.abstract_params(config))
    assert shapes["encoder"]["block_3"]["down"]["kernel"].shape == (16, 512, 1024)  # k16 s8, 512 -> 1024
    assert shapes["decoder"]["block_0"]["up"]["kernel"].shape == (16, 1024, 512)
    assert shapes["encoder"]["lstm"]["layer_1"]["recurrent_kernel"].shape == (1024, 4096)
    assert shapes["quantizer"]["codebooks"].shape == (4, 2048, 128)


def test_magnet_presets_give_music_and_sound_codecs():
    music = EncodecConfig.from_config(get_config("size=small,task=music").codec)
    sound = EncodecConfig.from_config(get_config("size=small,task=sound").codec)
    assert (music.sample_rate, music.hop_length, music.frame_rate) == (32000, 640, 50.0)
    assert (sound.sample_rate, sound.hop_length, sound.frame_rate) == (16000, 320, 50.0)
    assert music.n_q == sound.n_q == 4 and music.card == sound.card == 2048


def test_hub_weight_norm_names_load_like_transformers5_names(tiny_hf_dir, tmp_path):
    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    assert any(k.endswith("weight_g") for k in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    # hub config.json files list every field
    full = transformers.EncodecConfig.from_pretrained(tiny_hf_dir).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(full))

    config_a, params_a = load_encodec(tiny_hf_dir)
    config_b, params_b = load_encodec(tmp_path)
    assert config_a == config_b
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


@pytest.fixture(scope="module")
def audiocraft_encodec(tmp_path_factory):
    """audiocraft EncodecModel built by audiocraft's own builder from xp.cfg, exported as compression_state_dict.bin."""
    from references import audiocraft_stubs

    audiocraft_stubs.install()
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(TINY_AUDIOCRAFT_XP)
    cfg.device = "cpu"
    torch.manual_seed(0)
    with warnings.catch_warnings():  # audiocraft uses the deprecated torch.nn.utils.weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        model = builders.get_compression_model(cfg).eval()
    frames = centered_latent_frames(model.encoder, model.encoder.model[-1].conv.conv, audio(2, SR, seed=102))
    books = encodec.fit_codebooks(frames, 32, 4, seed=0)
    with torch.no_grad():
        for layer, book in zip(model.quantizer.vq.layers, books):
            layer._codebook.embed.copy_(torch.from_numpy(book))
            layer._codebook.inited.fill_(1.0)
    path = tmp_path_factory.mktemp("encodec_audiocraft") / "compression_state_dict.bin"
    torch.save(
        {"best_state": model.state_dict(), "xp.cfg": TINY_AUDIOCRAFT_XP, "version": "1.3.0", "exported": True}, path
    )
    return model, path


def test_codes_match_audiocraft_encodec(audiocraft_encodec):
    model, path = audiocraft_encodec
    config, params = load_encodec(path.parent)  # the directory, as in a MAGNeT/MusicGen repo
    assert (config.pad_mode, config.true_skip, config.card, config.n_q) == ("constant", True, 32, 4)
    wav = audio(2, 16000, seed=3)

    codes = np.asarray(encodec.encode(config, params, wav))
    (ref_codes, scale), ref_latents = reference_encode(model, wav)
    with torch.no_grad():
        ref_wav = model.decode(ref_codes, scale).numpy()
    assert scale is None
    assert_codes_spread(codes, min_unique=12)
    assert min_decision_margin(ref_latents, params["quantizer"]["codebooks"]) > 1e-6
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    assert np.abs(ref_wav).max() > 1e-3
    assert relative_error(encodec.decode(config, params, codes), ref_wav) <= 1e-4


@pytest.mark.parametrize("pointer", ["{dir}", "//pretrained/{dir}"])
def test_audiocraft_pretrained_pointer_loads_transformers_checkpoint(tiny_hf_dir, tmp_path, pointer):
    torch.save(
        {"pretrained": pointer.format(dir=tiny_hf_dir), "exported": True}, tmp_path / "compression_state_dict.bin"
    )
    config, params = load_encodec(tmp_path)
    expected_config, expected_params = load_encodec(tiny_hf_dir)
    assert config == expected_config
    jax.tree.map(np.testing.assert_array_equal, params, expected_params)


def assert_one_line_error(source, *fragments):
    with pytest.raises(WeightsError) as info:
        load_encodec(source)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_pointer_to_hub_id_offline_is_one_line_error(tmp_path):
    torch.save({"pretrained": "facebook/encodec_32khz"}, tmp_path / "compression_state_dict.bin")
    assert_one_line_error(tmp_path, "facebook/encodec_32khz", "local directory")


def test_hub_id_offline_is_one_line_error():
    assert_one_line_error("facebook/encodec_32khz", "facebook/encodec_32khz", "offline")


def test_missing_path_and_empty_directory_are_one_line_errors(tmp_path):
    assert_one_line_error(tmp_path / "absent", "absent")
    assert_one_line_error(tmp_path, "compression_state_dict.bin", "config.json")


@pytest.mark.parametrize(
    "change, fragments",
    [
        ("drop", ["missing", "decoder.layers.1.lstm.weight_hh_l1"]),
        ("add", ["unexpected", "encoder.layers.99.conv.bias"]),
        ("reshape", ["wrong shape", "quantizer.layers.2.codebook.embed", "(16, 8) != (16, 16)"]),
    ],
)
def test_state_dict_mismatch_is_one_line_error(tiny_hf_dir, tmp_path, change, fragments):
    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    if change == "drop":
        del state["decoder.layers.1.lstm.weight_hh_l1"]
    elif change == "add":
        state["encoder.layers.99.conv.bias"] = np.zeros(3, np.float32)
    else:
        state["quantizer.layers.2.codebook.embed"] = np.zeros((16, 8), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    assert_one_line_error(tmp_path, "model.safetensors", *fragments)


@pytest.mark.parametrize(
    "field, value", [("use_causal_conv", True), ("pad_mode", "circular"), ("norm_type", "time_group_norm")]
)
def test_unsupported_transformers_config_is_one_line_error(tiny_hf_dir, tmp_path, field, value):
    hf_config = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, field: value}))
    (tmp_path / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes())
    assert_one_line_error(tmp_path, "config.json", field)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"encodec": {"renormalize": True}}, "encodec.renormalize"),
        ({"seanet": {"causal": True}}, "seanet.causal"),
        ({"seanet": {"decoder": {"n_filters": 8}}}, "seanet.encoder.n_filters"),
        ({"seanet": {"activation": "GELU"}}, "seanet.activation"),
    ],
)
def test_unsupported_audiocraft_config_is_rejected(edit, fragment):
    xp = yaml.safe_load(TINY_AUDIOCRAFT_XP)
    for section, values in edit.items():
        for key, value in values.items():
            xp[section][key] = {**xp[section][key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=fragment.replace(".", r"\.")):
        encodec_weights.config_from_audiocraft(xp)


def test_audiocraft_file_without_best_state_is_one_line_error(tmp_path):
    torch.save({"xp.cfg": TINY_AUDIOCRAFT_XP}, tmp_path / "compression_state_dict.bin")
    assert_one_line_error(tmp_path, "compression_state_dict.bin", "best_state")


@pytest.fixture(scope="module")
def tiny_codec():
    config = EncodecConfig.from_config(get_config("size=tiny").codec)
    return config, encodec.init_encodec(config, seed=0, calibration_wav=audio(2, 2 * SR, seed=4))


def test_init_encodec_codes_use_many_codebook_entries(tiny_codec):
    config, params = tiny_codec
    assert (config.card, config.n_q, config.hop_length) == (64, 4, 640)
    codes = np.asarray(encodec.encode(config, params, audio(2, SR, seed=5)))  # audio not used for calibration
    assert_codes_spread(codes, min_unique=16)
    wav = encodec.decode(config, params, codes)
    assert wav.shape == (2, 1, SR) and float(jnp.std(wav)) > 0


def test_init_encodec_rejects_too_short_calibration_audio():
    config = EncodecConfig.from_config(get_config("size=tiny").codec)
    with pytest.raises(ValueError, match="need at least 128"):
        encodec.init_encodec(config, seed=0, calibration_wav=audio(1, SR, seed=4))


def test_encode_long_equals_encoding_each_fixed_chunk(tiny_codec):
    config, params = tiny_codec
    wav = audio(2, int(2.3 * SR), seed=6)
    codes = encodec.encode_long(config, params, wav, chunk_seconds=1.0)
    assert codes.shape == (2, 4, 115) and codes.dtype == np.int32
    tail = np.pad(wav[..., 2 * SR :], ((0, 0), (0, 0), (0, 3 * SR - wav.shape[-1])))
    chunks = [wav[..., :SR], wav[..., SR : 2 * SR], tail]
    expected = np.concatenate([np.asarray(encodec.encode(config, params, c)) for c in chunks], -1)[..., :115]
    np.testing.assert_array_equal(codes, expected)
    # one chunk spanning the whole file is whole-file encoding
    whole = wav[..., :SR]
    np.testing.assert_array_equal(
        encodec.encode_long(config, params, whole, chunk_seconds=1.0), np.asarray(encodec.encode(config, params, whole))
    )


def test_bfloat16_compute_stays_close_to_float32(tiny_codec):
    config, params = tiny_codec
    codes = encodec.encode(config, params, audio(2, SR, seed=7))
    reference = encodec.decode(config, params, codes)
    bf16 = encodec.decode(dataclasses.replace(config, dtype="bfloat16"), params, codes)
    assert bf16.dtype == jnp.float32
    assert relative_error(bf16, np.asarray(reference)) < 0.1


def test_codec_is_replicated_and_runs_data_parallel_on_a_mesh(tiny_codec):
    config, params = tiny_codec
    rules = get_config("size=tiny").sharding_rules
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(encodec.abstract_params(config)), mesh, rules)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))

    wav = audio(4, SR, seed=8)
    # reference in two batch-2 calls, so the mesh run below traces afresh with the axis rules active
    expected = np.concatenate([np.asarray(encodec.encode(config, params, wav[i : i + 2])) for i in (0, 2)])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_wav = jax.device_put(wav, NamedSharding(mesh, P(("data", "fsdp"))))
        codes = encodec.encode(config, jax.device_put(params, NamedSharding(mesh, P())), sharded_wav)
    assert codes.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(codes), expected)
