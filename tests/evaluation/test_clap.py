"""CLAP (magnet_jax.evaluation.clap) against laion_clap 1.1.7 and audiocraft's CLAPTextConsistencyMetric.

Two random-weight models, each saved in the released checkpoint format and read by `load_clap`:
- `real`: the architecture of the music checkpoint, HTSAT-base + roberta-base (only the vocabulary is the test
  tokenizer's 400 tokens instead of 50265), for the parity of the front end and both embeddings;
- `small`: the same code with small dimensions (HTS-AT embed_dim 16, 1 block per stage; RoBERTa 2 layers;
  laion_clap fixes the text width to 768), for the score through audiocraft's metric, the repeat-pad / random-crop
  paths, the checkpoint formats and the error messages.
Inputs are synthesized music clips at 32 kHz (the codec's rate) and their descriptions.
"""

import json

import numpy as np
import pytest
import soundfile as sf

from data_pipelines.synthetic_corpus import generate_corpus
from magnet_jax.data.audio import AudioError
from magnet_jax.evaluation import clap, clap_audio
from magnet_jax.evaluation.clap_text import RobertaConfig, load_clap_tokenizer, tokenize
from magnet_jax.fileio import WeightsError
from references import clap as clap_reference

RATE = 32_000
VOCAB = 400
SMALL_HTSAT = clap_audio.HtsatConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
SMALL = clap.ClapConfig(audio=SMALL_HTSAT, text=RobertaConfig(vocab_size=VOCAB, num_layers=2))
REAL = clap.ClapConfig(text=RobertaConfig(vocab_size=VOCAB))
SMALL_ROBERTA = {**clap_reference.ROBERTA_BASE, "vocab_size": VOCAB, "num_hidden_layers": 2}
REAL_ROBERTA = {**clap_reference.ROBERTA_BASE, "vocab_size": VOCAB}
EXTRA_TEXTS = ["Ünïcode prompt: café jazz — 120 bpm ♪", "long " * 120 + "prompt past the 77-token limit"]


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _torch_audio(audio: np.ndarray, rate: int):
    """audiocraft's preparation in clap_consistency.update: [B, N] -> convert_audio to 48 kHz mono -> [B, N48]."""
    import torch
    from audiocraft.data.audio_utils import convert_audio

    return convert_audio(torch.from_numpy(audio)[:, None], rate, clap_audio.SAMPLE_RATE, 1).mean(dim=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two 10 s clips at 32 kHz `[2, 320000]`, their files and descriptions."""
    paths = generate_corpus(tmp_path_factory.mktemp("clap_corpus"), num_clips=2, seconds=10.0, seed=3, sample_rate=RATE)
    audio = np.stack([sf.read(str(p), dtype="float32")[0] for p in paths])
    texts = [json.loads(p.with_suffix(".json").read_text())["description"] for p in paths]
    return audio, paths, texts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus):
    words = (
        corpus[2]
        + [
            "an upbeat electronic track with a driving drum beat",
            "calm ambient pad in C major",
            "funk bass line, sustained chords, melancholic minor key",
        ]
        + EXTRA_TEXTS
    )
    return clap_reference.write_tokenizer(tmp_path_factory.mktemp("clap_tokenizer"), words * 3, VOCAB)


def _model(tmp_path_factory, tokenizer_dir, roberta, htsat, config, seed):
    reference = clap_reference.build_reference(tokenizer_dir, roberta=roberta, htsat=htsat, seed=seed)
    path = clap_reference.save_released_format(reference.model, tmp_path_factory.mktemp("ckpt") / clap.CHECKPOINT_NAME)
    return reference, path, clap.load_clap(path, config)


@pytest.fixture(scope="module")
def real(tmp_path_factory, tokenizer_dir):
    return _model(tmp_path_factory, tokenizer_dir, REAL_ROBERTA, None, REAL, seed=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory, tokenizer_dir):
    return _model(tmp_path_factory, tokenizer_dir, SMALL_ROBERTA, SMALL_HTSAT, SMALL, seed=2)


def test_front_end_constants_are_librosas_and_torchlibrosas(small):
    import librosa

    reference, _, _ = small
    branch = reference.model.audio_branch
    mel = librosa.filters.mel(sr=48000, n_fft=1024, n_mels=64, fmin=50, fmax=14000).T
    assert relative_error(clap_audio.mel_filterbank(), mel) < 1e-6
    assert relative_error(clap_audio.mel_filterbank(), branch.logmel_extractor.melW.detach().numpy()) < 1e-6
    real_kernel, imag_kernel = clap_audio.stft_kernels()
    stft = branch.spectrogram_extractor.stft
    assert relative_error(real_kernel, stft.conv_real.weight.detach().numpy()) < 1e-6
    assert relative_error(imag_kernel, stft.conv_imag.weight.detach().numpy()) < 1e-6


def test_front_end_matches_htsat(real, corpus):
    """Resampled waveform and mel power <= 1e-5 of the reference; the log-mel (dB) and the bn0-normalised 256x256
    image <= 2e-4 of their range: float32 rounding of the quietest bands, ~100 dB below a clip's peak, where
    torchlibrosa's own STFT is 3e-5 of the range off a float64 one (see `clap_audio.log_mel`)."""
    import torch

    reference, _, params = real
    audio = corpus[0]
    branch = reference.model.audio_branch
    ref_wave = _torch_audio(audio, RATE)
    assert ref_wave.shape[1] == clap_audio.CLIP_SAMPLES  # 10 s at 32 kHz: exactly max_len, neither padded nor cut
    ours_wave = clap.clap_waveforms(audio, RATE)
    assert relative_error(ours_wave, ref_wave.numpy()) < 1e-5
    with torch.no_grad():
        spectrogram = branch.spectrogram_extractor(ref_wave)  # [B, 1, 1001, 513]
        ref_power = torch.matmul(spectrogram, branch.logmel_extractor.melW)[:, 0]
        ref_mel = branch.logmel_extractor(spectrogram)
        ref_image = branch.reshape_wav2img(branch.bn0(ref_mel.transpose(1, 3)).transpose(1, 3))
    assert relative_error(clap_audio.mel_power(ours_wave), ref_power.numpy()) < 1e-5
    ours_mel = clap_audio.log_mel(ours_wave)
    assert relative_error(ours_mel, ref_mel[:, 0].numpy()) < 2e-4
    assert float(np.abs(np.asarray(ours_mel) - ref_mel[:, 0].numpy()).mean()) < 1e-4  # dB
    bn0 = {"params": params["audio"]["audio_branch"]["bn0"]}
    ours_image = clap_audio.spectrogram_image(clap_audio.FrozenBatchNorm().apply(bn0, ours_mel))
    assert relative_error(ours_image[..., 0], ref_image[:, 0].numpy()) < 2e-4
    assert float(ref_image.std()) > 0.5  # bn0's statistics give a non-trivial image


def test_audio_embeddings_match_laion_clap(real, corpus):
    import torch

    reference, _, params = real
    audio = corpus[0]
    with torch.no_grad():
        ref = reference.get_audio_embedding_from_data(_torch_audio(audio, RATE), use_tensor=True).numpy()
    ours = clap.embed_audio(params, audio, RATE, config=REAL)
    assert ours.shape == (2, 512)
    assert relative_error(ours, ref) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert float(ref[0] @ ref[1]) < 0.99  # the two clips embed apart: the random model is not degenerate


def test_text_embeddings_match_laion_clap(real, corpus, tokenizer_dir):
    import torch

    reference, _, params = real
    texts = corpus[2] + EXTRA_TEXTS
    tokenizer = load_clap_tokenizer(tokenizer_dir)
    ids, mask = tokenize(tokenizer, texts)
    ref_tokens = reference.tokenizer(texts)  # CLAP_Module's call, with RobertaTokenizer.from_pretrained(dir)
    np.testing.assert_array_equal(np.asarray(ids), ref_tokens["input_ids"].numpy())
    np.testing.assert_array_equal(np.asarray(mask), ref_tokens["attention_mask"].numpy())
    assert ids.shape == (4, 77) and int(mask[3].sum()) == 77 and int(mask[0].sum()) < 77
    with torch.no_grad():
        ref = reference.get_text_embedding(texts, use_tensor=True).numpy()
    ours = clap.embed_text(params, tokenizer, texts, config=REAL)
    assert ours.shape == (4, 512)
    assert relative_error(ours, ref) < 1e-4


def test_real_config_shapes_are_the_music_checkpoints(real):
    """`expected_shapes(CLAP_MUSIC)` (from jax.eval_shape) names every tensor of laion_clap's HTSAT-base/roberta
    CLAP with its shape (the test model differs only in its vocabulary)."""
    reference, _, _ = real
    state = {k: tuple(v.shape) for k, v in reference.model.state_dict().items()}
    expected = clap.expected_shapes(clap.CLAP_MUSIC)
    word = "text_branch.embeddings.word_embeddings.weight"
    assert expected[word] == (50265, 768) and state[word] == (VOCAB, 768)
    assert {k: v for k, v in expected.items() if k != word} == {k: state[k] for k in expected if k != word}
    unused = {k for k in state if k not in expected}
    assert unused and all(k.startswith(clap.UNUSED_PREFIXES) or k.endswith(clap.UNUSED_SUFFIXES) for k in unused)
    assert state["audio_branch.layers.3.blocks.1.mlp.fc2.weight"] == (1024, 4096)  # HTSAT-base: 1024 features


def test_clap_score_matches_audiocraft_metric(small, corpus, tokenizer_dir):
    """audiocraft's CLAPTextConsistencyMetric (its own model loading, tokenizer and update) on the same
    checkpoint and batch; `clap_score_files` on the clips' files gives the same numbers."""
    import torch

    _, path, params = small
    audio, paths, texts = corpus
    metric = clap_reference.audiocraft_metric(path, tokenizer_dir, roberta=SMALL_ROBERTA, htsat=SMALL_HTSAT)
    batch = torch.from_numpy(audio)[:, None]
    metric.update(batch, texts, torch.tensor([audio.shape[1]] * 2), torch.tensor([RATE] * 2))
    ref_mean = metric.compute()
    ref_audio = metric.model.get_audio_embedding_from_data(_torch_audio(audio, RATE), use_tensor=True)
    ref_text = metric.model.get_text_embedding(texts, tokenizer=metric._tokenizer, use_tensor=True)
    ref_scores = torch.nn.functional.cosine_similarity(ref_audio, ref_text, dim=1, eps=1e-8).detach().numpy()
    tokenizer = load_clap_tokenizer(tokenizer_dir)
    scores, mean = clap.clap_score(
        clap.embed_audio(params, audio, RATE, config=SMALL), clap.embed_text(params, tokenizer, texts, config=SMALL)
    )
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert abs(mean - ref_mean) < 1e-5 and abs(ref_scores[0] - ref_scores[1]) > 1e-3
    file_scores, file_mean = clap.clap_score_files(params, tokenizer, paths, texts, config=SMALL)
    np.testing.assert_allclose(file_scores, ref_scores, atol=1e-5)
    assert abs(file_mean - ref_mean) < 1e-5


@pytest.mark.parametrize("seconds", [3.0, 14.0], ids=["repeatpad", "rand_trunc"])
def test_short_and_long_clips(small, corpus, seconds):
    """< 10 s: repeated and zero-padded; > 10 s: a random 10 s window per clip (same draws as NumPy's global RNG
    in laion_clap when seeded alike)."""
    import torch

    reference, _, params = small
    audio = corpus[0]
    clip = np.concatenate([audio, audio], axis=1)[:, : int(seconds * RATE)]
    np.random.seed(7)
    with torch.no_grad():
        ref = reference.get_audio_embedding_from_data(_torch_audio(clip, RATE), use_tensor=True).numpy()
    ours = clap.embed_audio(params, clip, RATE, config=SMALL, crop_rng=np.random.RandomState(7))
    assert relative_error(ours, ref) < 1e-4
    if seconds > 10:  # a different window gives a different embedding
        other = clap.embed_audio(params, clip, RATE, config=SMALL, crop_rng=np.random.RandomState(8))
        assert np.abs(other - ours).max() > 1e-3


@pytest.mark.parametrize("prefix,wrapped", [("", False), ("module.", False), ("", True)])
def test_checkpoint_formats(small, tmp_path, prefix, wrapped):
    """A bare state dict or the training wrapper, with or without DataParallel's prefix; a directory holding the
    released file name works like the file."""
    import jax

    reference, _, params = small
    other = clap_reference.save_released_format(
        reference.model, tmp_path / clap.CHECKPOINT_NAME, prefix=prefix, wrapped=wrapped
    )
    loaded = clap.load_clap(tmp_path, SMALL)
    assert other.exists()
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_and_wrong_checkpoints(small, tmp_path):
    import torch

    _, path, _ = small
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path / "absent.pt", SMALL)
    assert "absent.pt" in _one_line(e)
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path, SMALL)  # a directory without the checkpoint
    assert clap.CHECKPOINT_NAME in _one_line(e)
    with pytest.raises(WeightsError) as e:
        clap.load_clap(path, clap.CLAP_MUSIC)  # the small model read as HTSAT-base
    message = _one_line(e)
    assert "missing: audio_branch.layers.0.blocks.1." in message and "wrong shape: audio_branch." in message

    state = torch.load(str(path), weights_only=True)["state_dict"]
    broken = dict(state)
    del broken["module.audio_branch.norm.weight"]
    broken["module.audio_branch.fusion_model.weight"] = torch.zeros(3)
    torch.save(broken, str(tmp_path / "keys.pt"))
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path / "keys.pt", SMALL)
    message = _one_line(e)
    assert "missing: audio_branch.norm.weight" in message and "unexpected: audio_branch.fusion_model.weight" in message

    front = dict(state)
    front["module.audio_branch.logmel_extractor.melW"] = front["module.audio_branch.logmel_extractor.melW"] * 1.01
    torch.save(front, str(tmp_path / "front.pt"))
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path / "front.pt", SMALL)
    assert "audio_branch.logmel_extractor.melW differs" in _one_line(e)

    torch.save([1, 2, 3], str(tmp_path / "list.pt"))
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path / "list.pt", SMALL)
    assert "not a laion_clap checkpoint" in _one_line(e)
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    with pytest.raises(WeightsError) as e:
        clap.load_clap(tmp_path / "garbage.pt", SMALL)
    assert "garbage.pt" in _one_line(e)


def test_bad_audio_text_and_tokenizer(small, corpus, tokenizer_dir, tmp_path):
    _, _, params = small
    tokenizer = load_clap_tokenizer(tokenizer_dir)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....not audio")
    with pytest.raises(AudioError) as e:
        clap.clap_score_files(params, tokenizer, [bad], ["a prompt"], config=SMALL)
    assert "broken.wav" in _one_line(e)
    with pytest.raises(ValueError, match="2 audio files but 1 prompts"):
        clap.clap_score_files(params, tokenizer, corpus[1], ["one prompt"], config=SMALL)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        clap.embed_audio(params, corpus[0][0], RATE, config=SMALL)
    with pytest.raises(TypeError):
        clap.embed_text(params, tokenizer, "a bare string", config=SMALL)
    with pytest.raises(ValueError):
        clap.clap_score(np.ones((2, 4)), np.ones((3, 4)))
    with pytest.raises(WeightsError) as e:
        load_clap_tokenizer(tmp_path)
    assert "vocab.json" in _one_line(e)
