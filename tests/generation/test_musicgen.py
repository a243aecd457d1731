"""MusicGen (AR): delay pattern, KV-cache decoding, greedy parity with transformers' MusicgenForCausalLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from magnet_jax.checkpoints.lm_weights import import_transformers
from magnet_jax.generation.musicgen import generate_ar, sampler
from magnet_jax.models.codebook_patterns import apply_delay_pattern, revert_delay_pattern
from magnet_jax.models.lm import LanguageModel, LMConfig

V, K, D, H, N, B, L, T = 32, 4, 32, 4, 2, 2, 5, 20


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.manual_seed(0)
    hf = MusicgenForCausalLM(
        MusicgenDecoderConfig(
            vocab_size=V,
            num_codebooks=K,
            hidden_size=D,
            ffn_dim=4 * D,
            num_hidden_layers=N,
            num_attention_heads=H,
            pad_token_id=V,
            bos_token_id=V,
            decoder_start_token_id=V,
            max_position_embeddings=256,
        )
    ).eval()
    with torch.no_grad():  # random LMs are unconfident: sharpen the heads so greedy choices are not float noise
        for head in hf.lm_heads:
            head.weight.mul_(8)
    directory = tmp_path_factory.mktemp("musicgen")
    hf.save_pretrained(directory)
    config, params = import_transformers(str(directory), scan_layers=False)
    return hf, LanguageModel(LMConfig(**config["model"])), params


def test_delay_pattern_layout_and_inverse():
    codes = jnp.arange(2 * K * 6).reshape(2, K, 6)
    layout = apply_delay_pattern(codes, special=99)
    assert layout.shape == (2, K, 6 + K)
    assert (layout[:, :, 0] == 99).all()
    for q in range(K):
        np.testing.assert_array_equal(layout[:, q, 1 + q : 7 + q], codes[:, q])
        assert (layout[:, q, 1 : 1 + q] == 99).all() and (layout[:, q, 7 + q :] == 99).all()
    np.testing.assert_array_equal(revert_delay_pattern(layout), codes)


def test_greedy_generation_matches_transformers_token_for_token(reference):
    hf, model, params = reference
    enc = torch.randn(B, L, D, generator=torch.Generator().manual_seed(1))
    # transformers 5.23 traps: without an EncoderDecoderCache its generate mixes self- and cross-attention caches,
    # and without an explicit mask it masks the BOS step (pad == bos); both differ from its own forward pass.
    out = hf.generate(
        input_ids=torch.full((B * K, 1), V),
        attention_mask=torch.ones((B * K, 1), dtype=torch.long),
        encoder_hidden_states=enc,
        do_sample=False,
        max_new_tokens=T + K - 1,
        guidance_scale=None,
        num_return_sequences=1,
        past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = out.sequences.reshape(B, K, -1).numpy()
    condition = model.apply(
        {"params": params}, jnp.asarray(enc.numpy()), jnp.ones((B, L)), method=model.project_condition
    )
    codes, layout = generate_ar(
        model, params, condition, None, jax.random.key(0), length=T, cfg_coef=None, return_layout=True
    )
    assert len(np.unique(expected)) > 5  # a non-degenerate sequence
    np.testing.assert_array_equal(np.asarray(codes), expected)
    logits = np.asarray(model.apply({"params": params}, layout, condition))  # teacher-forced on our sequence
    ref_logits = np.stack([s.reshape(B, K, V).numpy() for s in out.logits], axis=2)  # [B, K, S-1, V]
    err = np.abs(logits[:, :, :-1] - ref_logits).max() / np.abs(ref_logits).max()
    assert err <= 1e-4


def test_prompt_frames_are_kept_and_sampling_is_seeded(reference):
    _, model, params = reference
    condition = jax.random.normal(jax.random.key(2), (2 * B, L, D)).at[B:].set(0.0)  # [cond; null]
    prompt = jax.random.randint(jax.random.key(3), (B, K, 6), 0, V)
    sample = sampler(top_k=8)
    a = generate_ar(
        model, params, condition, None, jax.random.key(4), length=T, cfg_coef=3.0, sample_fn=sample, prompt=prompt
    )
    b = generate_ar(
        model, params, condition, None, jax.random.key(4), length=T, cfg_coef=3.0, sample_fn=sample, prompt=prompt
    )
    c = generate_ar(
        model, params, condition, None, jax.random.key(5), length=T, cfg_coef=3.0, sample_fn=sample, prompt=prompt
    )
    np.testing.assert_array_equal(a[:, :, :6], prompt)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    assert int(a.max()) < V
