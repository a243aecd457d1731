"""VGGish: front end vs the FAD tool's chain, network vs torchvggish, PCA post-processing, weight loading."""

import zipfile

import jax
import numpy as np
import pytest
import torch

from magnet_jax.evaluation import vggish
from magnet_jax.evaluation.audio import resample
from magnet_jax.fileio import WeightsError
from references.evaluation_tools import fad_tool_examples
from references.parity import relative_error


def test_log_mel_matches_mel_features(reference_stubs, clips_32k):
    from torchvggish import mel_features

    audio16 = np.asarray(resample(clips_32k[0], 32_000, 16_000))
    ref = np.stack(
        [
            mel_features.log_mel_spectrogram(
                row.astype(np.float64),
                audio_sample_rate=16_000,
                log_offset=0.01,
                window_length_secs=0.025,
                hop_length_secs=0.010,
                num_mel_bins=64,
                lower_edge_hertz=125,
                upper_edge_hertz=7500,
            )
            for row in audio16
        ]
    )
    assert relative_error(vggish.log_mel_spectrogram(audio16), ref) < 1e-6


@pytest.fixture(scope="module")
def clips_16k(reference_stubs, clips_44k):
    """The 44.1 kHz clips brought to 16 kHz by julius (audiocraft's `convert_audio`), `[3, 41600]`."""
    from audiocraft.data.audio_utils import convert_audio

    return convert_audio(torch.from_numpy(clips_44k[0])[:, None], 44_100, 16_000, 1)[:, 0].numpy()


def test_fad_normalize_is_the_written_pcm(reference_stubs, clips_16k):
    from audiocraft.data.audio_utils import normalize_audio

    for row, ours in zip(clips_16k, vggish.fad_normalize(clips_16k)):
        peaked = normalize_audio(torch.from_numpy(row)[None], normalize=True, strategy="peak", peak_clip_headroom_db=1)
        pcm = np.clip(np.rint(peaked.numpy()[0] * 2**15), -(2**15), 2**15 - 1).astype(np.float64)
        np.testing.assert_array_equal(ours, pcm / max(0.1, pcm.max()))


def test_fad_front_end_matches_the_tool_chain(clips_16k):
    # From the same 16 kHz float32 samples: the resampler is checked on its own (test_evaluation_audio.py), as a
    # 4e-7 difference there flips the int16 rounding of ~1% of the samples the tool reads.
    ours = vggish.fad_examples(vggish.fad_normalize(clips_16k))
    ref = np.stack([fad_tool_examples(row, 16_000) for row in clips_16k])
    assert ours.shape == ref.shape == (3, vggish.vggish_windows(clips_16k.shape[1], 16_000), 96, 64)
    assert ours.shape[1] == 4  # 2.6 s: windows at 0, 0.5, 1, 1.5 s
    assert relative_error(ours, ref) < 1e-6


def test_network_matches_torchvggish(torch_vggish, vggish_params, clips_16k):
    model, _ = torch_vggish
    examples = np.concatenate([fad_tool_examples(row, 16_000) for row in clips_16k]).astype(np.float32)
    ours = np.asarray(vggish.VGGish().apply({"params": vggish_params}, examples))
    with torch.no_grad():
        full = model(torch.from_numpy(examples)[:, None]).numpy()  # torchvggish ends with ReLU(fc2)
    pre_activation = _torch_pre_activation(model, examples)
    assert 0.2 < (pre_activation > 0).mean() < 0.8 and pre_activation.std() > 0.1  # not a degenerate network
    assert relative_error(ours, pre_activation) < 1e-5
    assert relative_error(jax.nn.relu(ours), full) < 1e-5


def _torch_pre_activation(model, examples: np.ndarray) -> np.ndarray:
    """torchvggish's network without its final ReLU (the FAD tool's `vggish/embedding`): `[N, 96, 64] -> [N, 128]`."""
    with torch.no_grad():
        x = model.features(torch.from_numpy(np.asarray(examples, np.float32))[:, None])
        return torch.nn.Sequential(*list(model.embeddings)[:-1])(x.permute(0, 2, 3, 1).reshape(len(x), -1)).numpy()


@pytest.mark.parametrize("rate", [16_000, 44_100])
def test_embed_vggish_end_to_end(torch_vggish, vggish_params, clips_16k, clips_44k, rate):
    audio = clips_16k if rate == 16_000 else clips_44k[0]
    ours = vggish.embed_vggish(vggish_params, audio, rate)
    ref = np.stack([_torch_pre_activation(torch_vggish[0], fad_tool_examples(row, rate)) for row in audio])
    assert ours.shape == ref.shape == (3, 4, 128)
    # at 44.1 kHz the two resamplers' float32 rounding flips int16 samples the tool reads (see above)
    assert relative_error(ours, ref) < (1e-5 if rate == 16_000 else 5e-4)


def test_short_clip_has_no_windows(vggish_params):
    assert vggish.embed_vggish(vggish_params, np.ones((2, 15_000), np.float32) * 0.1, 16_000).shape == (2, 0, 128)
    assert vggish.vggish_windows(32_000, 32_000) == 1 and vggish.vggish_windows(31_999, 32_000) == 0


def test_silence_stays_finite(vggish_params):
    out = np.asarray(vggish.embed_vggish(vggish_params, np.zeros((1, 32_000), np.float32), 32_000))
    assert out.shape == (1, 1, 128) and np.isfinite(out).all()


def _pca_state(rng) -> dict:
    eigen, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    return {
        "pca_eigen_vectors": (eigen * rng.uniform(0.5, 3.0, (128, 1))).astype(np.float32),
        "pca_means": rng.normal(0.0, 0.5, 128).astype(np.float32),
    }


def _numpy1_pickle(path, state):
    """Saves `state` of ndarrays as NumPy 1.x would have pickled it (module `numpy.core.multiarray`)."""
    torch.save(state, path)
    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)


@pytest.mark.parametrize("layout", ["tensors", "numpy_arrays", "npz"])
def test_postprocess_matches_torchvggish(reference_stubs, tmp_path, layout):
    from torchvggish.torchvggish import Postprocessor

    state = _pca_state(np.random.default_rng(1))
    if layout == "tensors":
        path = tmp_path / "vggish_pca_params-970ea276.pth"
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    elif layout == "numpy_arrays":
        path = tmp_path / "vggish_pca_params-970ea276.pth"
        _numpy1_pickle(
            path, {"pca_eigen_vectors": state["pca_eigen_vectors"], "pca_means": state["pca_means"].reshape(-1, 1)}
        )
    else:
        path = tmp_path / "vggish_pca_params.npz"
        np.savez(path, **state)
    pca = vggish.load_vggish_pca(path)
    embeddings = np.random.default_rng(2).normal(0.0, 1.5, (64, 128)).astype(np.float32)
    reference = Postprocessor.__new__(Postprocessor)  # its constructor downloads the released parameters
    reference._pca_matrix = torch.from_numpy(state["pca_eigen_vectors"])
    reference._pca_means = torch.from_numpy(state["pca_means"].reshape(-1, 1))
    expected = reference.postprocess(torch.from_numpy(embeddings)).numpy()
    ours = np.asarray(vggish.postprocess(embeddings, pca))
    assert 10 < expected.std() and (expected == 0).mean() < 0.5  # spread over the 8-bit range
    np.testing.assert_array_equal(ours, expected)


def test_embed_vggish_with_pca_is_postprocessed(vggish_params, clips_32k, tmp_path):
    np.savez(tmp_path / "pca.npz", **_pca_state(np.random.default_rng(3)))
    pca = vggish.load_vggish_pca(tmp_path / "pca.npz")
    raw = vggish.embed_vggish(vggish_params, clips_32k[0][:1], 32_000)
    np.testing.assert_array_equal(
        vggish.embed_vggish(vggish_params, clips_32k[0][:1], 32_000, pca), vggish.postprocess(raw, pca)
    )


def test_loader_errors(torch_vggish, tmp_path):
    model, _ = torch_vggish
    with pytest.raises(WeightsError, match="is not a file"):
        vggish.load_vggish(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="cannot read .*garbage.pth as a PyTorch pickle"):
        vggish.load_vggish(garbage)
    state = {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()}  # shapes, tiny files
    renamed = {k.replace("embeddings.4", "embeddings.6"): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(
        WeightsError,
        match="missing: embeddings.4.bias, embeddings.4.weight; unexpected: embeddings.6.bias, embeddings.6.weight",
    ) as e:
        vggish.load_vggish(tmp_path / "renamed.pth")
    assert "\n" not in str(e.value)
    torch.save({**state, "features.0.weight": state["features.0.weight"][:32]}, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"wrong shape: features.0.weight \(32, 1, 3, 3\) != \(64, 1, 3, 3\)"):
        vggish.load_vggish(tmp_path / "shape.pth")
    np.savez(tmp_path / "bad_pca.npz", pca_eigen_vectors=np.zeros((128, 64)), pca_means=np.zeros(128))
    with pytest.raises(WeightsError, match=r"wrong shape: pca_eigen_vectors \(128, 64\) != \(128, 128\)"):
        vggish.load_vggish_pca(tmp_path / "bad_pca.npz")
