"""Our LM against the PyTorch references on the same random weights, converted by `magnet_jax.checkpoints.lm_weights`.

- transformers `MusicgenForCausalLM` / `MusicgenForConditionalGeneration` (causal MusicGen) through the
  transformers-format importer;
- audiocraft 1.3.0 `MagnetLMModel` (xformers attention path, emulated by `audiocraft_stubs`) through the audiocraft
  importer, stages 0-3, with padded conditioning fed as `condition_tensors`.
The helpers at the top are reused by test_convert.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magnet_jax.checkpoints import lm_weights
from magnet_jax.models.lm import LanguageModel, LMConfig
from references.audiocraft_lm import TINY, audiocraft_lm, state_dict_numpy
from references.parity import assert_close
from references.transformers_musicgen import musicgen_decoder_config

RTOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# transformers MusicGen (causal)


def _spread(model):
    """transformers' init makes near-zero logits; widen every weight so comparisons are meaningful."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def test_causal_logits_match_transformers_musicgen(tmp_path):
    from transformers import MusicgenForCausalLM

    reference = _spread(MusicgenForCausalLM(musicgen_decoder_config())).eval()
    reference.save_pretrained(tmp_path)
    config, params = lm_weights.import_lm(str(tmp_path))
    assert config["model"]["causal"] and config["provenance"]["format"] == "transformers"

    rng = np.random.default_rng(0)
    batch, length, cond_len = 2, 12, 5
    codes = rng.integers(0, 33, (batch, 4, length))
    states = rng.standard_normal((batch, cond_len, 32)).astype(np.float32)
    mask = np.array([[1] * 5, [1, 1, 0, 0, 0]])
    with torch.no_grad():
        expected = reference(
            input_ids=torch.tensor(codes.reshape(batch * 4, length)),
            encoder_hidden_states=torch.tensor(states),
            encoder_attention_mask=torch.tensor(mask),
        ).logits.reshape(batch, 4, length, 32)
    model = LanguageModel(LMConfig(**config["model"]))
    condition = model.apply({"params": params}, states, mask, method=model.project_condition)
    ours = model.apply({"params": params}, jnp.asarray(codes), condition, jnp.asarray(mask, bool))
    print("max relative error:", assert_close(ours, expected.numpy()))


def test_conditional_generation_file_matches_transformers(tmp_path):
    """`MusicgenForConditionalGeneration` keys: `decoder.*`, `enc_to_dec_proj` -> cond_proj; T5/EnCodec ignored."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenForConditionalGeneration, T5Config

    text = T5Config(vocab_size=50, d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3, dropout_rate=0.0)
    audio = EncodecConfig(
        codebook_size=32,
        codebook_dim=8,
        hidden_size=8,
        num_filters=2,
        num_residual_layers=1,
        upsampling_ratios=[4, 4],
        num_lstm_layers=1,
        target_bandwidths=[1.0],
    )
    reference = MusicgenForConditionalGeneration(
        MusicgenConfig(
            text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=musicgen_decoder_config().to_dict()
        )
    )
    _spread(reference.decoder)
    _spread(reference.enc_to_dec_proj)
    reference.eval().save_pretrained(tmp_path)
    config, params = lm_weights.import_lm(str(tmp_path))
    assert config["model"]["cond_dim"] == 24 and config["conditioner"]["t5_dim"] == 24

    rng = np.random.default_rng(1)
    ids = torch.tensor(rng.integers(2, 50, (2, 6)))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    codes = rng.integers(0, 33, (2, 4, 10))
    with torch.no_grad():
        expected = reference(
            input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(codes.reshape(8, 10))
        ).logits.reshape(2, 4, 10, 32)
        states = reference.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    model = LanguageModel(LMConfig(**config["model"]))
    condition = model.apply({"params": params}, states, mask.numpy(), method=model.project_condition)
    ours = model.apply({"params": params}, jnp.asarray(codes), condition, jnp.asarray(mask.numpy(), bool))
    print("max relative error:", assert_close(ours, expected.numpy()))


# ---------------------------------------------------------------------------------------------------------------
# audiocraft MAGNeT


@pytest.fixture(scope="module")
def magnet_reference():
    return audiocraft_lm(**TINY)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_magnet_logits_match_audiocraft_stages_0_to_3(magnet_reference, scan_layers):
    config = LMConfig(**TINY, scan_layers=scan_layers)
    params = lm_weights.params_from_audiocraft(state_dict_numpy(magnet_reference), config, source="audiocraft")
    model = LanguageModel(config)

    rng = np.random.default_rng(2)
    batch, length, cond_len = 2, 40, 6
    tokens = rng.integers(0, TINY["card"] + 1, (batch, TINY["n_q"], length))
    states = rng.standard_normal((batch, cond_len, TINY["cond_dim"])).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 0, 0, 0, 0]])  # row 1 padded: audiocraft attends its zero vectors
    with torch.no_grad():
        embeds = magnet_reference.condition_provider.conditioners["description"].output_proj(torch.tensor(states))
        condition_tensors = {"description": (embeds * torch.tensor(mask)[..., None], torch.tensor(mask))}
    # Our batches are padded to a static length: 3 extra positions that `cond_attend` excludes.
    static_states = np.concatenate([states, rng.standard_normal((batch, 3, TINY["cond_dim"]))], 1).astype(np.float32)
    static_mask = np.concatenate([mask, np.zeros((batch, 3), int)], 1)
    attend = np.arange(cond_len + 3)[None, :].repeat(batch, 0) < cond_len
    condition = model.apply({"params": params}, static_states, static_mask, method=model.project_condition)
    logits = jax.jit(lambda codes, stage: model.apply({"params": params}, codes, condition, attend, stage))

    errors, previous = [], None
    for stage in range(4):
        codes = tokens.copy()
        codes[:, stage + 1 :] = TINY["card"]  # codebooks above the stage are masked, as in training and decoding
        with torch.no_grad():
            expected = magnet_reference(torch.tensor(codes), [], condition_tensors, stage=stage).numpy()
        ours = logits(codes, stage)
        errors.append(assert_close(ours, expected))
        if previous is not None:
            assert np.abs(expected - previous).max() > 0.1  # every stage is a different computation
        previous = expected
    print("max relative error per stage:", errors)
