"""Fréchet distance between Gaussians fitted to feature sets (FID / FVD), in float64.

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``. The trace of the matrix square
root is taken by an eigen-decomposition route rather than ``scipy.linalg.sqrtm(S1 @ S2)``:
``S1^{1/2} S2 S1^{1/2}`` is symmetric positive semi-definite with the same eigenvalues as ``S1 S2``,
so ``tr((S1 S2)^{1/2})`` is the sum of the square roots of its eigenvalues (``eigh``, tiny negative
round-off clipped to 0). That stays real and finite for the rank-deficient covariances of small
evaluation sets (fewer clips than feature dimensions), where ``sqrtm`` gives complex parts or
fails. The result is floored at 0.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, float64; N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {f.shape}.")
    if f.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors; got {f.shape[0]}. Evaluate more clips.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) (float64)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: means {mu1.shape} / {mu2.shape}, covariances {s1.shape} / "
                         f"{s2.shape}.")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) * 0.5)
    trace_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt), 0.0)


def feature_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians of two (N, D) feature sets (FVD when they are I3D logits)."""
    return frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
