"""Shared by the evaluation tests: real synthesized music clips and the reference packages' import stubs."""

import numpy as np
import pytest
import soundfile as sf
import torch

from data_pipelines.synthetic_corpus import generate_corpus


@pytest.fixture(scope="session")
def reference_stubs():
    """torchvggish, hear21passt and audiocraft's metrics import on this box (see references/audiocraft_stubs.py)."""
    from references import audiocraft_stubs

    audiocraft_stubs.install()


def _clips(root, sample_rate: int, seconds: float, num_clips: int) -> tuple[np.ndarray, list]:
    paths = generate_corpus(root, num_clips=num_clips, seconds=seconds, seed=0, sample_rate=sample_rate)
    return np.stack([sf.read(str(p), dtype="float32")[0] for p in paths]), paths


@pytest.fixture(scope="session")
def clips_32k(tmp_path_factory):
    """Three 2.5 s clips at 32 kHz `[3, 80000]` (the codec's rate) and their files."""
    return _clips(tmp_path_factory.mktemp("corpus32k"), 32_000, 2.5, 3)


@pytest.fixture(scope="session")
def clips_44k(tmp_path_factory):
    """Three 2.6 s clips at 44.1 kHz `[3, 114660]` (a typical reference-set rate) and their files."""
    return _clips(tmp_path_factory.mktemp("corpus44k"), 44_100, 2.6, 3)


@pytest.fixture(scope="session")
def torch_vggish(reference_stubs, tmp_path_factory):
    """torchvggish's VGG with He-scaled random weights, saved as `vggish-10086976.pth`; (model, path)."""
    from torchvggish import torchvggish as tv

    torch.manual_seed(0)
    model = tv._vgg().eval()  # the port's network (no download, no post-processing)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, float(np.sqrt(2.0 / fan_in)))
                module.bias.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("vggish") / "vggish-10086976.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="session")
def vggish_params(torch_vggish):
    """Our loader's params of `torch_vggish`."""
    from magnet_jax.evaluation.vggish import load_vggish

    return load_vggish(torch_vggish[1])
