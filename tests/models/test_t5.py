"""The Flax T5 encoder against transformers' T5EncoderModel, and its weight loading errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5EncoderModel, T5Tokenizer

from magnet_jax.checkpoints.t5_weights import load_t5, write_random_t5
from magnet_jax.fileio import WeightsError
from magnet_jax.models.t5 import T5Encoder, relative_position_bucket

CORPUS = [
    "happy rock song with drums and electric guitar",
    "calm piano melody in a minor key",
    "jazz with saxophone, upright bass and brushes",
    "électro à la française, 128 bpm",
    "lo-fi hip hop beat to relax",
] * 20


@pytest.fixture(scope="module", params=["relu", "gated-gelu"])
def t5_dir(request, tmp_path_factory):
    return write_random_t5(
        tmp_path_factory.mktemp(request.param),
        corpus=CORPUS,
        feed_forward_proj=request.param,
        d_model=48,
        num_layers=3,
        num_heads=4,
        d_kv=12,
        d_ff=96,
    )


def test_last_hidden_state_matches_transformers_on_padded_batch(t5_dir):
    config, params = load_t5(str(t5_dir))
    reference = T5EncoderModel.from_pretrained(str(t5_dir)).eval()
    tokens = T5Tokenizer.from_pretrained(str(t5_dir))(
        ["happy rock", "calm piano melody with jazz drums and bass, relaxing and slow", ""],
        return_tensors="pt",
        padding=True,
    )
    assert tokens["attention_mask"].sum(1).unique().numel() == 3  # three different lengths: real padding
    with torch.no_grad():
        expected = reference(**tokens).last_hidden_state.numpy()
    ours = np.asarray(
        T5Encoder(config).apply(
            {"params": params}, jnp.asarray(tokens["input_ids"].numpy()), jnp.asarray(tokens["attention_mask"].numpy())
        )
    )
    assert np.abs(expected).max() > 0.1
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 300)[None, :]
    expected = T5Attention._relative_position_bucket(
        torch.tensor(rel), bidirectional=True, num_buckets=32, max_distance=128
    ).numpy()
    np.testing.assert_array_equal(np.asarray(relative_position_bucket(jnp.asarray(rel), 32, 128)), expected)


def test_bfloat16_switch_runs_close_to_float32(t5_dir):
    config32, params32 = load_t5(str(t5_dir))
    config16, params16 = load_t5(str(t5_dir), dtype="bfloat16")
    ids, mask = jnp.array([[5, 6, 7, 1]]), jnp.ones((1, 4), jnp.int32)
    a = T5Encoder(config32).apply({"params": params32}, ids, mask)
    b = T5Encoder(config16).apply({"params": params16}, ids, mask)
    assert b.dtype == jnp.bfloat16
    assert float(jnp.abs(a - b.astype(jnp.float32)).max()) < 0.1 * float(jnp.abs(a).max())


def test_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(WeightsError, match="is neither a file nor a directory holding config.json") as e:
        load_t5(str(tmp_path / "nope"))
    assert "\n" not in str(e.value)


def test_directory_without_weights_names_the_missing_file(tmp_path, t5_dir):
    (tmp_path / "config.json").write_text((t5_dir / "config.json").read_text())
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        load_t5(str(tmp_path))


def test_malformed_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8}))
    with pytest.raises(WeightsError, match="not a T5 config.json"):
        load_t5(str(tmp_path))


def test_hub_id_offline_says_what_was_looked_for():
    with pytest.raises(WeightsError, match="config.json of hub id 't5-base' is not in the local cache"):
        load_t5("t5-base")


def test_wrong_shapes_and_missing_keys_are_listed(tmp_path, t5_dir):
    from safetensors.numpy import load_file, save_file

    for name in ("config.json", "spiece.model"):
        (tmp_path / name).write_bytes((t5_dir / name).read_bytes())
    state = load_file(str(t5_dir / "model.safetensors"))
    state["encoder.final_layer_norm.weight"] = state["encoder.final_layer_norm.weight"][:-1]
    del state["encoder.block.1.layer.0.SelfAttention.q.weight"]
    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_t5(str(tmp_path))
    msg = str(e.value)
    assert "missing: encoder.block.1.layer.0.SelfAttention.q.weight" in msg
    assert "unexpected: encoder.extra.weight" in msg and "wrong shape: encoder.final_layer_norm.weight" in msg
