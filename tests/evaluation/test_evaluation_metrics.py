"""Fréchet distance, embedding statistics and their files, KL divergence vs audiocraft's definition."""

import numpy as np
import pytest
import torch

from magnet_jax.data.audio import AudioError
from magnet_jax.evaluation import metrics
from magnet_jax.evaluation.metrics import StatisticsError


def _gaussian_embeddings(rng, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return (rng.standard_normal((n, dim)) * rng.uniform(0.2, 2.0, dim)) @ mixing + shift


def _frechet_by_eigendecomposition(mu1, sigma1, mu2, sigma2) -> float:
    """The distance with Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), both factors symmetric (an independent route)."""
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@pytest.mark.parametrize("dim,n", [(16, 200), (128, 600)])
def test_frechet_distance_matches_the_formula(dim, n):
    rng = np.random.default_rng(dim)
    stats1 = metrics.embedding_statistics(_gaussian_embeddings(rng, n, dim))
    stats2 = metrics.embedding_statistics(_gaussian_embeddings(rng, n, dim, shift=0.3))
    ours = metrics.frechet_distance(*stats1, *stats2)
    expected = _frechet_by_eigendecomposition(*stats1, *stats2)
    assert ours > 1.0 and abs(ours - expected) <= 1e-6 * expected
    assert abs(metrics.frechet_distance(*stats2, *stats1) - ours) <= 1e-6 * ours
    assert abs(metrics.frechet_distance(*stats1, *stats1)) < 1e-6 * ours


def test_frechet_distance_retries_with_an_offset(monkeypatch):
    rng = np.random.default_rng(0)
    stats1 = metrics.embedding_statistics(_gaussian_embeddings(rng, 100, 8))
    stats2 = metrics.embedding_statistics(_gaussian_embeddings(rng, 100, 8, shift=1.0))
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def sqrtm(a):  # the first attempt "fails" as on a singular product
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm)
    retried = metrics.frechet_distance(*stats1, *stats2)
    offset = np.eye(8) * metrics.SQRTM_EPS
    np.testing.assert_array_equal(calls[1], (stats1[1] + offset) @ (stats2[1] + offset))
    assert abs(retried - _frechet_by_eigendecomposition(*stats1, *stats2)) < 1e-5


def test_frechet_distance_errors():
    with pytest.raises(StatisticsError, match="statistics do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(StatisticsError, match="large imaginary components"):  # not covariances: no real root
        metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_embedding_statistics():
    x = _gaussian_embeddings(np.random.default_rng(1), 300, 12).astype(np.float32)
    mu, sigma = metrics.embedding_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(StatisticsError, match="refs: no embeddings"):
        metrics.embedding_statistics(np.zeros((0, 128)), source="refs")
    with pytest.raises(StatisticsError, match="refs: 128 embeddings of dimension 128; the covariance needs more"):
        metrics.embedding_statistics(np.zeros((128, 128)), source="refs")


def test_kl_divergence_matches_audiocraft(reference_stubs):
    from audiocraft.metrics.kld import kl_divergence as audiocraft_kl

    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 3.0, (2, 40, 527))
    p_ref, p_gen = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p_ref[:5, :100] = 0.0  # exact zeros contribute nothing
    p_ref[:5] /= p_ref[:5].sum(-1, keepdims=True)
    p_ref, p_gen = p_ref.astype(np.float32), p_gen.astype(np.float32)
    # audiocraft: kl_divergence(pred_probs=generated, target_probs=reference)
    expected = audiocraft_kl(torch.from_numpy(p_gen), torch.from_numpy(p_ref)).numpy()
    ours = metrics.kl_divergence(p_ref, p_gen)
    assert ours.shape == (40,) and ours.min() > 0.5
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    self_kl = metrics.kl_divergence(p_ref, p_ref)  # only the epsilon's effect: about -eps per class
    assert (self_kl < 0).all() and (self_kl > -527 * metrics.KL_EPS).all()
    with pytest.raises(StatisticsError, match="must both be"):
        metrics.kl_divergence(p_ref, p_gen[:-1])


def test_statistics_files(tmp_path):
    mu, sigma = metrics.embedding_statistics(_gaussian_embeddings(np.random.default_rng(3), 50, 6))
    path = metrics.save_statistics(tmp_path / "stats" / "musiccaps_vggish.npz", mu, sigma)
    assert sorted(p.name for p in path.parent.iterdir()) == ["musiccaps_vggish.npz"]  # no temporary left over
    loaded = metrics.load_statistics(path)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    np.savez(tmp_path / "no_sigma.npz", mu=mu)
    with pytest.raises(StatisticsError, match="no_sigma.npz: statistics file has no sigma"):
        metrics.load_statistics(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=mu, sigma=sigma[:5])
    with pytest.raises(StatisticsError, match=r"shapes.npz: expected mu \[D\] and sigma \[D, D\], got \(6,\)"):
        metrics.load_statistics(tmp_path / "shapes.npz")
    (tmp_path / "text.npz").write_text("mu, sigma")
    with pytest.raises(StatisticsError, match="text.npz: cannot read statistics .npz"):
        metrics.load_statistics(tmp_path / "text.npz")
    with pytest.raises(StatisticsError, match="non-finite"):
        metrics.save_statistics(tmp_path / "nan.npz", mu * np.nan, sigma)
    assert not (tmp_path / "nan.npz").exists()


def test_vggish_statistics_of_a_directory(vggish_params, clips_44k, tmp_path):
    from magnet_jax.evaluation.vggish import embed_vggish

    audio, paths = clips_44k
    embeddings = metrics.vggish_embeddings(vggish_params, paths, batch_size=2)
    np.testing.assert_allclose(
        embeddings,
        embed_vggish(vggish_params, audio, 44_100).reshape(-1, 128),
        rtol=1e-5,
        atol=1e-6 * np.abs(embeddings).max(),
    )
    assert embeddings.shape == (12, 128)  # 3 clips x 4 windows
    with pytest.raises(StatisticsError, match="12 embeddings of dimension 128"):  # too few clips for FAD
        metrics.vggish_statistics(vggish_params, paths[0].parent)
    with pytest.raises(StatisticsError, match="no audio files"):
        metrics.vggish_statistics(vggish_params, tmp_path)
    (tmp_path / "clip.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(AudioError, match="clip.wav: cannot read audio"):
        metrics.vggish_statistics(vggish_params, tmp_path)


def test_vggish_statistics_end_to_end(vggish_params, tmp_path):
    from data_pipelines.synthetic_corpus import generate_corpus

    generate_corpus(tmp_path, num_clips=12, seconds=6.0, seed=4, sample_rate=16_000, formats=("wav", "flac"))
    mu, sigma = metrics.vggish_statistics(vggish_params, tmp_path, batch_size=8)  # 12 clips x 11 windows
    assert mu.shape == (128,) and sigma.shape == (128, 128) and np.linalg.eigvalsh(sigma).min() > -1e-9
    assert metrics.frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)
