"""Tokenizer, conditioner outputs vs audiocraft's T5Conditioner, CFG/word dropout, cross-attention padding."""

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from transformers import T5Tokenizer

from magnet_jax.checkpoints.t5_weights import load_t5, write_random_t5
from magnet_jax.data.tokenizer import TextTokenizer, drop_words
from magnet_jax.fileio import WeightsError
from magnet_jax.models import conditioner as cond_lib
from magnet_jax.models.lm import LanguageModel, LMConfig, init_params

CORPUS = [
    "happy rock song with drums and electric guitar",
    "calm piano melody in a minor key",
    "jazz with saxophone, upright bass and brushes",
    "électro à la française, 128 bpm",
    "lo-fi hip hop beat to relax",
    "ambient pads and field recordings",
] * 20
DESCRIPTIONS = [
    "happy rock",
    None,
    "calm piano melody with jazz drums and bass, relaxing",
    "électro à la française",
    "",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_random_t5(tmp_path_factory.mktemp("t5"), corpus=CORPUS, d_model=32, num_layers=2)


def test_token_ids_match_transformers_and_sentencepiece(t5_dir):
    long = " ".join(CORPUS[:12])
    texts = ["happy rock", "électro à la française — ça groove", "", long]
    tok = TextTokenizer(str(t5_dir), max_length=2048)
    ours = tok(texts)
    ref = T5Tokenizer.from_pretrained(str(t5_dir))(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["ids"], ref["input_ids"])
    sp = spm.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    for row, text in zip(ours["ids"], texts):
        expected = sp.encode(text) + [1]  # EOS appended
        np.testing.assert_array_equal(row[: len(expected)], expected)
        assert (row[len(expected) :] == 0).all()
    assert ours["ids"].shape[1] > 100  # the long description is really long
    np.testing.assert_array_equal(ours["mask"][2], 0)  # empty -> null condition
    np.testing.assert_array_equal(ours["mask"][0], ref["attention_mask"][0])


def test_long_descriptions_keep_their_first_tokens_and_eos(t5_dir):
    text = " ".join(CORPUS[:12])
    full = TextTokenizer(str(t5_dir), max_length=4096)([text])["ids"][0]
    cut = TextTokenizer(str(t5_dir), max_length=10)([text])["ids"][0]
    np.testing.assert_array_equal(cut, np.concatenate([full[:9], [1]]))


def test_tokenizer_is_picklable_for_grain_workers(t5_dir):
    tok = TextTokenizer(str(t5_dir), max_length=64, word_dropout=0.3)
    again = pickle.loads(pickle.dumps(tok))
    np.testing.assert_array_equal(again(DESCRIPTIONS)["ids"], tok(DESCRIPTIONS)["ids"])


def _audiocraft_t5_conditioner(t5_dir, output_dim):
    from references import audiocraft_stubs

    audiocraft_stubs.install()
    from audiocraft.modules.conditioners import T5Conditioner

    name = str(t5_dir)
    T5Conditioner.MODELS = T5Conditioner.MODELS + [name]  # the reference only knows hub ids; test-only allow-list
    T5Conditioner.MODELS_DIMS = {**T5Conditioner.MODELS_DIMS, name: 32}
    return T5Conditioner(name, output_dim, finetune=False, device="cpu").eval()


def test_conditioning_matches_audiocraft_t5_conditioner_with_padding_and_nulls(t5_dir):
    torch.manual_seed(0)
    reference = _audiocraft_t5_conditioner(t5_dir, output_dim=24)
    with torch.no_grad():
        embeds, mask = reference(reference.tokenize(DESCRIPTIONS))
    tok = TextTokenizer(str(t5_dir))
    tokens = tok(DESCRIPTIONS)
    np.testing.assert_array_equal(tokens["mask"], mask.numpy())
    t5_config, t5_params = load_t5(str(t5_dir))
    states = cond_lib.encode_text(t5_config, t5_params, tokens["ids"], tokens["mask"])
    proj = {
        "kernel": reference.output_proj.weight.detach().numpy().T,
        "bias": reference.output_proj.bias.detach().numpy(),
    }
    ours = np.asarray(cond_lib.ConditionProjection(24).apply({"params": proj}, states, jnp.asarray(tokens["mask"])))
    expected = embeds.numpy()
    assert np.abs(expected).max() > 0.1
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5
    assert (ours[1] == 0).all() and (ours[4] == 0).all()  # null rows are exactly zero


def _conditioning(t5_dir, descriptions, *, pad_to=None):
    """T5 states, mask and `cross_attend` of `descriptions`, the text padded to `pad_to` tokens when given."""
    tokenizer = TextTokenizer(str(t5_dir))
    tokens = tokenizer(descriptions)
    ids, mask = tokens["ids"], tokens["mask"]
    if pad_to is not None:
        extra = ((0, 0), (0, pad_to - ids.shape[1]))
        ids, mask = np.pad(ids, extra, constant_values=tokenizer.pad_id), np.pad(mask, extra)
    t5_config, t5_params = load_t5(str(t5_dir))
    return {
        "states": cond_lib.encode_text(t5_config, t5_params, ids, mask),
        "mask": jnp.asarray(mask),
        "attend": cond_lib.cross_attend(ids, tokenizer.pad_id),
    }


def test_static_padding_with_cross_attend_equals_reference_padding(t5_dir):
    """Padding the condition further (static shapes for jit) must not change the LM, given `cross_attend`."""
    tight, padded = _conditioning(t5_dir, DESCRIPTIONS), _conditioning(t5_dir, DESCRIPTIONS, pad_to=64)
    assert padded["states"].shape[1] == 64 > tight["states"].shape[1]
    assert bool(tight["attend"].all())  # at the reference's own padding every position is attended
    model = LanguageModel(LMConfig(32, 4, 2, card=16, cond_dim=32))
    params = {"params": nn.meta.unbox(init_params(model, jax.random.key(0)))}
    codes = jax.random.randint(jax.random.key(1), (len(DESCRIPTIONS), 4, 12), 0, 17)

    def logits(c, attend):
        condition = model.apply(params, c["states"], c["mask"], method=model.project_condition)
        return model.apply(params, codes, condition, attend)

    reference = logits(tight, None)
    np.testing.assert_allclose(logits(padded, padded["attend"]), reference, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(logits(padded, None) - reference).max()) > 1e-4  # attending the extra zeros would differ


def test_word_dropout_rate_and_reproducibility():
    words = [" ".join(f"w{i}" for i in range(50))] * 40  # 2000 words
    key = jax.random.key(3)
    kept = sum(len(e.split()) for e in drop_words(words, key, 0.3)) / 2000
    assert abs((1 - kept) - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)
    assert drop_words(words, key, 0.3) == drop_words(words, key, 0.3)
    assert drop_words(words, key, 0.3) != drop_words(words, jax.random.key(4), 0.3)


def test_word_dropout_only_with_a_key_and_all_dropped_becomes_null(t5_dir):
    tok = TextTokenizer(str(t5_dir), word_dropout=1.0)
    assert tok(["calm piano"])["mask"].sum() > 0  # no key: inference, no dropout
    assert tok(["calm piano"], word_dropout_key=jax.random.key(0))["mask"].sum() == 0


def test_cfg_dropout_nullifies_whole_batch_at_rate_p():
    mask = jnp.ones((6, 5), jnp.int32)
    keys = jax.random.split(jax.random.key(0), 2000)
    out = jax.vmap(lambda k: cond_lib.cfg_dropout(k, mask, 0.3))(keys)
    per_batch = out.reshape(2000, -1).sum(-1)
    assert set(np.unique(per_batch).tolist()) == {0, 30}  # all rows dropped together, or none
    rate = float((per_batch == 0).mean())
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2000)


def test_tokenizer_errors_name_what_was_looked_for(tmp_path):
    with pytest.raises(WeightsError, match="has no spiece.model"):
        TextTokenizer(str(tmp_path))
    with pytest.raises(WeightsError, match="spiece.model of hub id 't5-base' is not in the local cache"):
        TextTokenizer("t5-base")
