"""FAD and KL as audiocraft reports them: Fréchet distance of VGGish statistics, KL of PaSST label distributions.

- `frechet_distance` is google-research frechet_audio_distance/fad_utils.py's formula, in float64:
  |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2)), with scipy's `sqrtm`; if that is not
  finite, 1e-7 is added to both diagonals and it is computed again (the same retry as pytorch-fid's, whose eps is
  1e-6); a square root whose diagonal has an imaginary part above 1e-3 is an error, a smaller one is dropped.
- `embedding_statistics` is the FAD tool's `ComputeMeanAndCovariance` (create_embeddings_beam.py): float64 sums,
  mu = sum(x) / n, sigma = sum(x x^T) / (n - 1) - mu mu^T n / (n - 1). It needs more embeddings than dimensions
  (with fewer the covariance is singular and the distance meaningless), so a smaller set is an error.
- `kl_divergence(p_ref, p_gen)` is audiocraft/metrics/kld.py's `kl_divergence(pred_probs, target_probs)`:
  per row, sum_c p_ref log(p_ref / (p_gen + 1e-6)) (0 where p_ref = 0), the reference distribution first;
  the reported "kld" is its mean over all segment pairs (`kld_pq`; swapping the arguments gives `kld_qp`).

Reference statistics (`mu` [D], `sigma` [D, D]) are written to and read from `.npz` files (`save_statistics`,
`load_statistics`), or computed from a directory of audio files with `vggish_statistics`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import linalg

from magnet_jax.data.audio import audio_files, read_audio
from magnet_jax.evaluation.vggish import EMBEDDING_SIZE, embed_vggish

SQRTM_EPS = 1e-7  # fad_utils._stable_trace_sqrt_product
KL_EPS = 1e-6  # kld.kl_divergence


class StatisticsError(ValueError):
    """Embedding statistics could not be computed, read or compared (message is one line)."""


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (`mu` [D], `sigma` [D, D]), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise StatisticsError(
            f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
            f"{sigma2.shape}; expected mu [D] and sigma [D, D] for one D"
        )
    sqrt_product = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(sqrt_product).all():  # a singular product: offset both diagonals and retry
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        sqrt_product = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.allclose(np.diagonal(sqrt_product).imag, 0, atol=1e-3):
        raise StatisticsError(
            "the square root of sigma1 @ sigma2 has large imaginary components "
            f"(max {np.abs(np.diagonal(sqrt_product).imag).max():.3g})"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(sqrt_product.real))


def embedding_statistics(embeddings, *, source: str = "embeddings") -> tuple[np.ndarray, np.ndarray]:
    """`[N, D]` embeddings -> (mu [D], sigma [D, D]) float64, as the FAD tool accumulates them (N > D)."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2:
        raise StatisticsError(f"{source}: expected embeddings [N, D], got shape {x.shape}")
    n, dim = x.shape
    if n == 0:
        raise StatisticsError(f"{source}: no embeddings (an empty set has no statistics)")
    if n <= dim:
        raise StatisticsError(
            f"{source}: {n} embeddings of dimension {dim}; the covariance needs more than {dim} (it would be singular)"
        )
    mu = x.sum(axis=0) / n
    sigma = (x.T @ x) / (n - 1) - np.outer(mu, mu) * n / (n - 1)
    return mu, sigma


def kl_divergence(p_ref, p_gen, eps: float = KL_EPS) -> np.ndarray:
    """KL(p_ref || p_gen + eps) per row: `[S, C]` label distributions of reference and generated audio -> `[S]`."""
    p_ref, p_gen = np.asarray(p_ref, np.float64), np.asarray(p_gen, np.float64)
    if p_ref.shape != p_gen.shape or p_ref.ndim != 2:
        raise StatisticsError(f"label distributions must both be [S, C] and equal: {p_ref.shape} vs {p_gen.shape}")
    safe_ref = np.where(p_ref > 0, p_ref, 1.0)
    return np.sum(np.where(p_ref > 0, p_ref * (np.log(safe_ref) - np.log(p_gen + eps)), 0.0), axis=-1)


# ---- statistics files and directories -------------------------------------------------------------------


def save_statistics(path: str | os.PathLike, mu, sigma, **arrays) -> Path:
    """Writes `mu` [D], `sigma` [D, D] (float64) and any further named `arrays` to an `.npz` (a temporary name,
    then a rename)."""
    path = Path(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_statistics(mu, sigma, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **arrays)
    os.replace(tmp, path)
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu [D], sigma [D, D]) float64 from an `.npz` written by `save_statistics` (or any with those keys)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StatisticsError(f"{path}: cannot read statistics .npz ({reason})") from e
    missing = sorted({"mu", "sigma"} - set(arrays))
    if missing:
        raise StatisticsError(f"{path}: statistics file has no {', '.join(missing)} (keys: {sorted(arrays)})")
    mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
    _check_statistics(mu, sigma, str(path))
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str) -> None:
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise StatisticsError(f"{source}: expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatisticsError(f"{source}: statistics hold non-finite values")


def vggish_embeddings(params, paths, *, batch_size: int = 16) -> np.ndarray:
    """All FAD-window embeddings `[N, 128]` of the audio files `paths` (files of equal length and rate batched)."""
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for path in paths:
        wav, sr = read_audio(path)
        wav = wav.mean(axis=0)  # mono, as the references downmix
        groups.setdefault((wav.shape[0], sr), []).append(wav)
    out = [np.zeros((0, EMBEDDING_SIZE), np.float32)]
    for (length, sr), clips in groups.items():
        for start in range(0, len(clips), batch_size):
            chunk = clips[start : start + batch_size]
            batch = np.zeros((batch_size, length), np.float32)  # silent rows keep one compiled shape
            batch[: len(chunk)] = np.stack(chunk)
            embeddings = embed_vggish(params, batch, sr)[: len(chunk)]
            out.append(embeddings.reshape(-1, EMBEDDING_SIZE))
    return np.concatenate(out)


def vggish_statistics(params, directory: str | os.PathLike, *, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """FAD statistics (mu, sigma) of every audio file directly inside `directory`."""
    paths = audio_files(directory)
    if not paths:
        raise StatisticsError(f"{directory}: no audio files (.wav, .flac, .ogg, .mp3)")
    return embedding_statistics(vggish_embeddings(params, paths, batch_size=batch_size), source=str(directory))
