"""Import stubs that let the PyTorch references (installed with --no-deps) be imported on a CPU-only box.

audiocraft 1.3.0 imports torchaudio, xformers, spacy, librosa, av and torchmetrics at module level, but the code paths
the parity tests use (SEANet, RVQ, MAGNeT LM, the KL metric) need none of them except `xformers.ops` (emulated with
torch SDPA) and `torchaudio.functional.resample` (julius). The evaluation references need: hear21passt 0.0.26
`torchaudio.compliance.kaldi.get_mel_banks` (no torchaudio wheel matches torch 2.13, so it is implemented below from
Kaldi's definition and tested in tests/evaluation/test_reference_stubs.py), `torchaudio.transforms.FrequencyMasking`
/ `TimeMasking` (built in its constructor, used only in training mode), and timm's `download_cached_file` (imported,
never called without a download); torchvggish 0.2 imports resampy (for rates other than 16 kHz, which no test uses).
Anything else from a stubbed module raises NotImplementedError when called, so a test can never silently run on a
stub.

Usage (in a test module or fixture, before the first `import audiocraft...`):

    from references import audiocraft_stubs
    audiocraft_stubs.install()
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


class _Unavailable:
    """Placeholder for any attribute of a stubbed module: usable as a base class, fails when called."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"{self._name} is stubbed for the audiocraft parity tests")

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Unavailable(f"{self._name}.{item}")

    def __mro_entries__(self, bases):
        return (object,)


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)

    def __getattr__(item, _name=name):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Unavailable(f"{_name}.{item}")

    module.__getattr__ = __getattr__
    sys.modules[name] = module
    return module


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        if importlib.util.find_spec(name) is None:
            return False
        __import__(name)
        return True
    except Exception:  # a broken install (e.g. torchaudio's CUDA wheel) counts as absent
        return False


def memory_efficient_attention(q, k, v, attn_bias=None, p: float = 0.0):
    """xformers' attention on [B, T, H, D] tensors, computed with torch SDPA (additive `attn_bias`)."""
    import torch

    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p)
    return out.transpose(1, 2)


def get_mel_banks(
    num_bins: int,
    window_length_padded: int,
    sample_freq: float,
    low_freq: float,
    high_freq: float,
    vtln_low: float,
    vtln_high: float,
    vtln_warp_factor: float,
):
    """torchaudio.compliance.kaldi.get_mel_banks without VTLN warping (Kaldi's MelBanks, mel = 1127 ln(1 + f/700)).

    Returns (bins [num_bins, window_length_padded / 2], center_freqs [num_bins]): bin m is a triangle, linear in
    mel, rising from mel_low + m * delta to 1 at mel_low + (m + 1) * delta and back to 0 at mel_low + (m + 2) * delta,
    with delta = (mel(high) - mel(low)) / (num_bins + 1), sampled at the FFT bin frequencies k * sample_freq /
    window_length_padded. A high_freq <= 0 counts from the Nyquist frequency. Computed in float32 as torchaudio does.
    """
    import math

    import torch

    if vtln_warp_factor != 1.0:
        raise NotImplementedError("get_mel_banks stub: VTLN warping (vtln_warp_factor != 1) is not implemented")
    assert num_bins > 3 and window_length_padded % 2 == 0
    nyquist = 0.5 * sample_freq
    if high_freq <= 0.0:
        high_freq += nyquist
    assert 0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq

    def mel(f):
        return 1127.0 * (1.0 + f / 700.0).log() if isinstance(f, torch.Tensor) else 1127.0 * math.log(1.0 + f / 700.0)

    mel_low, mel_high = mel(low_freq), mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins).unsqueeze(1)
    left, center, right = (mel_low + (index + offset) * delta for offset in (0.0, 1.0, 2.0))
    fft_mel = mel(sample_freq / window_length_padded * torch.arange(window_length_padded / 2)).unsqueeze(0)
    rising = (fft_mel - left) / (center - left)
    falling = (right - fft_mel) / (right - center)
    bins = torch.clamp(torch.minimum(rising, falling), min=0.0)
    center_freqs = 700.0 * ((center[:, 0] / 1127.0).exp() - 1.0)
    return bins, center_freqs


def _training_only(name: str):
    """A module class that can be built (hear21passt builds its SpecAugment masks) but raises if it is ever run."""
    import torch

    class TrainingOnly(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

        def forward(self, *args, **kwargs):
            raise NotImplementedError(f"torchaudio.transforms.{name} is stubbed (training-time augmentation)")

    TrainingOnly.__name__ = name
    return TrainingOnly


def install() -> None:
    """Registers stubs for the optional modules audiocraft imports; real installs are left alone."""
    import julius
    import torch

    if not _importable("torchaudio"):
        torchaudio = _stub("torchaudio", __version__="0.0.0+stub")
        torchaudio.functional = _stub(
            "torchaudio.functional",
            resample=lambda wav, orig, new, *a, **k: julius.resample_frac(wav, int(orig), int(new)),
        )
        torchaudio.transforms = _stub(
            "torchaudio.transforms",
            FrequencyMasking=_training_only("FrequencyMasking"),
            TimeMasking=_training_only("TimeMasking"),
        )
        torchaudio.compliance = _stub("torchaudio.compliance")
        torchaudio.compliance.kaldi = _stub("torchaudio.compliance.kaldi", get_mel_banks=get_mel_banks)
    if not _importable("xformers"):
        xformers = _stub("xformers")
        xformers.profiler = _stub("xformers.profiler")
        xformers.ops = _stub("xformers.ops", unbind=torch.unbind, memory_efficient_attention=memory_efficient_attention)
    for name in ("spacy", "av", "torchmetrics"):
        if not _importable(name):
            _stub(name)
    if not _importable("librosa"):
        _stub("librosa", filters=_stub("librosa.filters"))
    if not _importable("resampy"):
        _stub("resampy")
    if not _importable("timm"):
        timm = _stub("timm")
        timm.models = _stub("timm.models")
        timm.models._hub = _stub("timm.models._hub")
