"""Import stubs that let audiocraft 1.3.0 (installed with --no-deps) be imported on a CPU-only box.

audiocraft imports torchaudio, xformers, spacy, librosa, av and torchmetrics at module level, but the code paths the
parity tests use (SEANet, RVQ, MAGNeT LM) need none of them except `xformers.ops` (emulated with torch SDPA) and
`torchaudio.functional.resample` (julius). Anything else from a stubbed module raises NotImplementedError when
called, so a test can never silently run on a stub.

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
        torchaudio.transforms = _stub("torchaudio.transforms")
    if not _importable("xformers"):
        xformers = _stub("xformers")
        xformers.profiler = _stub("xformers.profiler")
        xformers.ops = _stub("xformers.ops", unbind=torch.unbind, memory_efficient_attention=memory_efficient_attention)
    for name in ("spacy", "av", "torchmetrics"):
        if not _importable(name):
            _stub(name)
    if not _importable("librosa"):
        _stub("librosa", filters=_stub("librosa.filters"))
