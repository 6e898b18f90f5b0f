"""Fréchet distance between Gaussians fitted to feature sets (FID / FVD), in float64.

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``. The trace of the matrix square
root is taken by an eigen-decomposition route rather than ``scipy.linalg.sqrtm(S1 @ S2)``:
``S1^{1/2} S2 S1^{1/2}`` is symmetric positive semi-definite with the same eigenvalues as ``S1 S2``,
so ``tr((S1 S2)^{1/2})`` is the sum of the square roots of its eigenvalues (``eigh``, tiny negative
round-off clipped to 0). That stays real and finite for the rank-deficient covariances of small
evaluation sets (fewer clips than feature dimensions), where ``sqrtm`` gives complex parts or
fails. The result is floored at 0. Sets with fewer vectors than dimensions take an exact route through
their (N1, N2) cross products instead (``_sample_space_frechet``).

``bootstrap_interval`` resamples the clips of both sets to show how much of a distance is sampling
luck; ``FVD_MIN_CLIPS`` is the set size below which an FVD is flagged (see its comment).
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


def _sample_space_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The same distance through the (N1, N2) matrix of centred features instead of (D, D) covariances.

    With centred ``A`` (N1, D), ``B`` (N2, D): ``S1 = A^T A / (N1 - 1)``, ``S2 = B^T B / (N2 - 1)``, and the
    nonzero eigenvalues of ``S1 S2`` are those of ``(A B^T)(A B^T)^T / ((N1 - 1)(N2 - 1))``, so
    ``tr((S1 S2)^{1/2})`` is the sum of the singular values of ``A B^T`` over ``sqrt((N1 - 1)(N2 - 1))``.
    Exact, and for evaluation-sized sets (fewer clips than I3D's 400 logits) a small SVD instead of
    three 400 x 400 eigendecompositions: what makes a 200-resample bootstrap cheap.
    """
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu1, b - mu2
    n1, n2 = len(a) - 1, len(b) - 1
    trace_sqrt = float(np.sum(np.linalg.svd(ca @ cb.T, compute_uv=False))) / np.sqrt(n1 * n2)
    diff = mu1 - mu2
    return max(float(diff @ diff + np.sum(ca * ca) / n1 + np.sum(cb * cb) / n2 - 2.0 * trace_sqrt), 0.0)


def feature_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians of two (N, D) feature sets (FVD when they are I3D logits)."""
    fa, fb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if fa.ndim == fb.ndim == 2 and fa.shape[1] == fb.shape[1] and min(len(fa), len(fb)) >= 2 \
            and max(len(fa), len(fb)) < fa.shape[1]:
        return _sample_space_frechet(fa, fb)
    return frechet_distance(*gaussian_statistics(fa), *gaussian_statistics(fb))


# Below this many clips per set an FVD is flagged. A convention, not a derived bound: the Fréchet
# estimate is biased upward by (tr Sa + tr Sb) / N from the means alone and more from the covariances,
# and with fewer clips than features (400 I3D logits) the covariances are rank-deficient, so a small-N
# FVD depends on N as much as on the videos. 256 is a floor that an evaluation suite can reach while
# N is of the order of the feature count; a flagged FVD still compares runs of one suite (same N),
# never numbers computed elsewhere. ``bootstrap_interval`` shows the spread at the N actually used.
FVD_MIN_CLIPS = 256


def bootstrap_interval(a_features: np.ndarray, b_features: np.ndarray, *, samples: int = 200, seed: int = 0,
                       confidence: float = 0.95, paired: bool = False) -> tuple[float, float]:
    """Percentile bootstrap interval of the Fréchet distance of two (N, D) feature sets: how much of an
    FVD is the luck of which clips were drawn.

    Each of ``samples`` draws resamples the clips (rows) of each set with replacement from one
    ``numpy.random.default_rng(seed)`` (deterministic in ``seed``): independently, or with ``paired``
    (sets of one length whose row i belong together, as an evaluation's generated clip i and its true
    clip i) the same rows of both, so the interval is the spread over which cases the suite drew and
    a set against itself stays at 0. The interval is the ``confidence`` central range of those
    distances. A resampled set repeats clips, so it has fewer distinct ones and a larger distance
    (the estimator's upward bias, again): the interval tends to sit above the point estimate. Read it
    as the spread of the FVD, and compare intervals of equal-size sets.
    """
    a, b = np.asarray(a_features, np.float64), np.asarray(b_features, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with one D; got {a.shape} and {b.shape}.")
    if paired and len(a) != len(b):
        raise ValueError(f"a paired bootstrap needs sets of one length; got {len(a)} and {len(b)}.")
    if not 0.0 < confidence < 1.0 or samples < 2:
        raise ValueError(f"need 0 < confidence < 1 and samples >= 2; got {confidence} and {samples}.")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(samples)):
        ia = rng.integers(0, len(a), len(a))
        ib = ia if paired else rng.integers(0, len(b), len(b))
        values.append(feature_frechet_distance(a[ia], b[ib]))
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)
