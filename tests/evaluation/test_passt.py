"""PaSST: mel front end vs hear21passt's AugmentMelSTFT, logits vs the real 20 s architecture (random weights),
label distributions and KL vs audiocraft's PasstKLDivergenceMetric, weight loading."""

import contextlib
import dataclasses
import functools
import io

import numpy as np
import pytest
import soundfile as sf
import torch

from data_pipelines.synthetic_corpus import generate_corpus
from magnet_jax.evaluation import passt
from magnet_jax.evaluation.metrics import kl_divergence
from magnet_jax.fileio import WeightsError
from references.parity import relative_error


def _quiet(fn, *args):
    """hear21passt prints its shapes on the first forward and on construction."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def reference_mel(reference_stubs):
    """hear21passt.base20sec's front end, exactly as `get_basic_model` builds it, in eval mode."""
    from hear21passt.models.preprocess import AugmentMelSTFT

    return _quiet(
        functools.partial(
            AugmentMelSTFT,
            n_mels=128,
            sr=32000,
            win_length=800,
            hopsize=320,
            n_fft=1024,
            freqm=48,
            timem=192,
            htk=False,
            fmin=0.0,
            fmax=None,
            norm=1,
            fmin_aug_range=10,
            fmax_aug_range=2000,
        )
    ).eval()


@pytest.fixture(scope="module")
def reference_model(reference_mel, tmp_path_factory):
    """The real `passt_20sec` network (depth 12, 768 wide, 200 time positions) with realistic random weights,
    wrapped as audiocraft loads it (`mode="logits"`), and its state dict saved as the released `.pt`."""
    from hear21passt.models.passt import PaSST
    from hear21passt.wrapper import PasstBasicWrapper

    torch.manual_seed(0)
    net = _quiet(
        functools.partial(
            PaSST,
            img_size=(128, 2000),
            patch_size=16,
            stride=(10, 10),
            in_chans=1,
            num_classes=527,
            embed_dim=768,
            depth=12,
            num_heads=12,
            distilled=True,
        )
    ).eval()
    state = net.state_dict()
    for name, value in state.items():
        if name.endswith(".bias"):
            state[name] = 0.05 * torch.randn(value.shape)
        elif value.ndim == 1:  # LayerNorm scales
            state[name] = 1.0 + 0.1 * torch.randn(value.shape)
        elif "pos_embed" in name or "token" in name:
            state[name] = 0.5 * torch.randn(value.shape)
        else:
            state[name] = torch.randn(value.shape) / float(np.sqrt(value[0].numel()))
    state["head.1.weight"] *= 3.0  # peaked label distributions, not near-uniform ones
    net.load_state_dict(state)
    path = tmp_path_factory.mktemp("passt") / "passt-s-f128-20sec-p16-s10-ap.474-swa.pt"
    torch.save(net.state_dict(), path)
    wrapper = PasstBasicWrapper(mel=reference_mel, net=net, max_model_window=20000, mode="logits").eval()
    return wrapper, path


@pytest.fixture(scope="module")
def params(reference_model):
    return passt.load_passt(reference_model[1], passt.PASST_20S)


def _reference_forward(fn, *args):
    from audiocraft.metrics.kld import _patch_passt_stft  # torch 2.13's stft needs return_complex

    with torch.no_grad(), _patch_passt_stft(), contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def test_kaldi_mel_banks_match_the_reference(reference_stubs):
    import torchaudio

    banks, _ = torchaudio.compliance.kaldi.get_mel_banks(
        128, 1024, 32000, 0.0, 15000.0, vtln_low=100.0, vtln_high=-500.0, vtln_warp_factor=1.0
    )
    ours = passt.kaldi_mel_banks()
    assert ours.shape == (128, 513) and not ours[:, -1].any()
    np.testing.assert_allclose(ours[:, :512], banks.numpy(), rtol=0, atol=5e-5)  # float32 log rounding of mel


def test_mel_matches_augment_mel_stft(reference_mel, clips_32k):
    audio = clips_32k[0]
    ref = _reference_forward(reference_mel, torch.from_numpy(audio)).numpy()
    ours = np.asarray(passt.mel_spectrogram(audio))
    assert ours.shape == ref.shape == (3, 128, passt.mel_frames(audio.shape[1]))
    # The reference computes in float32 (float32 mel banks included): on these clips it is 2e-4 of the range from
    # its own float64 evaluation, in the quietest bands; ours follows its float32 arithmetic to 2e-5 - 4e-5 (FFT
    # rounding, which depends on the CPU's FFT code path) and is never further than it from the float64 result.
    torch.set_default_dtype(torch.float64)
    try:
        exact = _reference_forward(reference_mel.double(), torch.from_numpy(audio).double()).numpy()
    finally:
        torch.set_default_dtype(torch.float32)
        reference_mel.float()
    assert relative_error(ours, ref) < 1e-4
    assert relative_error(ours, exact) < 1.01 * relative_error(ref, exact)


def test_logits_match_the_real_architecture(reference_model, params, clips_32k):
    wrapper, _ = reference_model
    audio = clips_32k[0]
    ref = _reference_forward(wrapper, torch.from_numpy(audio)).numpy()
    ours = np.asarray(passt.passt_logits(passt.PASST_20S, params, audio))
    assert ours.shape == ref.shape == (3, 527)
    probs = torch.softmax(torch.from_numpy(ref), -1).numpy()
    assert ref.std() > 1.0 and probs.max(-1).min() > 20 / 527  # peaked, not near-uniform distributions
    assert relative_error(ours, ref) < 1e-5


@pytest.fixture(scope="module")
def generated_44k(tmp_path_factory):
    """Three other 2.6 s clips at 44.1 kHz standing in for generated audio."""
    paths = generate_corpus(tmp_path_factory.mktemp("gen44k"), num_clips=3, seconds=2.6, seed=1, sample_rate=44_100)
    return np.stack([sf.read(str(p), dtype="float32")[0] for p in paths])


def test_label_probs_and_kl_match_audiocraft(reference_model, params, clips_44k, generated_44k):
    from audiocraft.metrics.kld import PasstKLDivergenceMetric

    # The metric with its real code paths; its segment length cut to 1 s so that a few seconds of audio
    # exercise the splitting (2.6 s -> 1 + 1 + 0.6 s; 2.1 s -> 1 + 1 s + a dropped 0.1 s; 0.1 s -> nothing).
    metric = PasstKLDivergenceMetric.__new__(PasstKLDivergenceMetric)  # torchmetrics is stubbed: no __init__
    metric.model, metric.device = reference_model[0], "cpu"
    metric.model_sample_rate, metric.max_input_frames, metric.min_input_frames = 32_000, 32_000, 4_800
    for name in ("kld_pq_sum", "kld_qp_sum", "kld_all_sum"):
        setattr(metric, name, torch.tensor(0.0))
    metric.weight = torch.tensor(0)
    config = dataclasses.replace(passt.PASST_20S, max_seconds=1.0)
    sizes = np.array([114_660, 92_610, 4_410])
    rates = torch.full((3,), 44_100)

    ref_probs = _reference_forward(
        metric._get_label_distribution, torch.from_numpy(clips_44k[0])[:, None], torch.from_numpy(sizes), rates
    ).numpy()
    ours = passt.passt_label_probs(params, clips_44k[0], 44_100, config=config, lengths=sizes, batch_size=4)
    assert ours.probs.shape == ref_probs.shape == (5, 527)
    np.testing.assert_array_equal(ours.clip_index, [0, 0, 0, 1, 1])
    assert relative_error(ours.probs, ref_probs) < 1e-4

    gen = passt.passt_label_probs(params, generated_44k, 44_100, config=config, lengths=sizes, batch_size=4)
    _reference_forward(
        metric.update,
        torch.from_numpy(generated_44k)[:, None],
        torch.from_numpy(clips_44k[0])[:, None],
        torch.from_numpy(sizes),
        rates,
    )
    expected = metric.compute()
    kld_pq = kl_divergence(ours.probs, gen.probs).mean()  # KL(reference || generated), audiocraft's "kld"
    kld_qp = kl_divergence(gen.probs, ours.probs).mean()
    assert kld_pq > 0.1 and kld_qp > 0.1
    assert abs(kld_pq - expected["kld"]) < 1e-4 * expected["kld"]
    assert abs(kld_qp - expected["kld_qp"]) < 1e-4 * expected["kld_qp"]


def test_clips_without_segments():
    probs = passt.passt_label_probs({}, np.zeros((2, 3000), np.float32), 32_000)
    assert probs.probs.shape == (0, 527) and probs.clip_index.shape == (0,)
    assert passt.segment_bounds(20 * 32_000 + 4_801, passt.PASST_20S) == [(0, 640_000), (640_000, 644_801)]
    assert passt.segment_bounds(20 * 32_000 + 4_800, passt.PASST_20S) == [(0, 640_000)]


def test_bad_inputs(params):
    with pytest.raises(ValueError, match=r"audio must be \[B, N\] mono"):
        passt.passt_label_probs(params, np.zeros(10), 32_000)
    with pytest.raises(ValueError, match="lengths must be"):
        passt.passt_label_probs(params, np.zeros((2, 10)), 32_000, lengths=[5, 11])
    with pytest.raises(ValueError, match="gives 12x204 patches; the model has 12x200 positions"):
        passt.passt_logits(passt.PASST_20S, params, np.zeros((1, int(20.5 * 32_000)), np.float32))


def test_loader_checks_the_checkpoint(reference_model, tmp_path):
    _, path = reference_model
    with pytest.raises(WeightsError, match="is not a file"):
        passt.load_passt(tmp_path / "passt.pt")
    with pytest.raises(WeightsError, match=r"wrong shape: time_new_pos_embed \(1, 768, 1, 200\) != \(1, 768, 1, 99\)"):
        passt.load_passt(path, passt.PASST_10S)  # the 20 s checkpoint is not the 10 s model
    with pytest.raises(WeightsError, match=r"unexpected: blocks\.11\.attn\.proj\.bias") as e:
        passt.load_passt(path, dataclasses.replace(passt.PASST_20S, depth=11))
    assert "\n" not in str(e.value)
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="cannot read .*garbage.pt as a PyTorch pickle"):
        passt.load_passt(tmp_path / "garbage.pt")
