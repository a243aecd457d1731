"""The stand-ins references/audiocraft_stubs.py gives for what cannot be installed with torch 2.13."""

import math

import numpy as np
import pytest
import torch


def _mel(hz):
    return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)


@pytest.mark.parametrize(
    "num_bins,padded,rate,low,high", [(128, 1024, 32_000, 0.0, 15_000.0), (23, 512, 16_000, 20.0, -400.0)]
)
def test_get_mel_banks_is_kaldis_definition(reference_stubs, num_bins, padded, rate, low, high):
    import torchaudio

    bins, centers = torchaudio.compliance.kaldi.get_mel_banks(
        num_bins, padded, rate, low, high, vtln_low=100.0, vtln_high=-500.0, vtln_warp_factor=1.0
    )
    assert bins.shape == (num_bins, padded // 2) and centers.shape == (num_bins,)
    top = high if high > 0 else rate / 2 + high
    edges = np.linspace(_mel(low), _mel(top), num_bins + 2)  # equally spaced in mel, neighbours share edges
    fft_mel = _mel(np.arange(padded // 2) * rate / padded)
    for m in range(num_bins):  # a triangle in mel: 0 at edges[m], 1 at edges[m + 1], 0 at edges[m + 2]
        triangle = np.interp(fft_mel, edges[m : m + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
        np.testing.assert_allclose(bins[m].numpy(), triangle, rtol=0, atol=1e-4)
    np.testing.assert_allclose(centers.numpy(), 700.0 * (np.exp(edges[1:-1] / 1127.0) - 1.0), rtol=1e-5)
    assert math.isclose(float(bins.sum(0).max()), 1.0, rel_tol=1e-3)  # overlapping triangles sum to at most 1


def test_unimplemented_paths_raise(reference_stubs):
    import torchaudio

    if not torchaudio.__version__.endswith("+stub"):
        pytest.skip(f"torchaudio {torchaudio.__version__} is installed: no stub to check")
    with pytest.raises(NotImplementedError, match="VTLN"):
        torchaudio.compliance.kaldi.get_mel_banks(128, 1024, 32_000, 0.0, 15_000.0, 100.0, -500.0, 0.9)
    mask = torchaudio.transforms.FrequencyMasking(48, iid_masks=True)  # built by hear21passt's constructor
    with pytest.raises(NotImplementedError, match="FrequencyMasking is stubbed"):
        mask(torch.zeros(1, 128, 10))
    import resampy

    with pytest.raises(NotImplementedError):
        resampy.resample(np.zeros(10), 44_100, 16_000)
