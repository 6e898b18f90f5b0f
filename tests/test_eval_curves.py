"""Flicker (eval/temporal.py), fidelity-by-keyframe-distance curves (eval/curves.py) and the FVD
bootstrap (eval/frechet.py) against known answers.

Known answers: the temporal second difference of a linear ramp (0), of frames alternating +a / -a
(4a) and of two constant shots around a cut (worked by hand); keyframe distances worked by hand; a
constant error of 0.02 on chosen frames (PSNR = 10 log10(4 / 0.02^2) = 40 dB exactly); Gaussian
feature sets whose Fréchet distance is known in closed form.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from director_jax.data.synthetic import make_movie
from director_jax.eval.baselines import crossfade
from director_jax.eval.curves import distance_curve, keyframe_distance
from director_jax.eval.frechet import FVD_MIN_CLIPS, bootstrap_interval, feature_frechet_distance
from director_jax.eval.metrics import psnr
from director_jax.eval.temporal import MAX_PSNR, flicker

# ------------------------------------------------------------------------------------------------
# Flicker


def test_flicker_known_answers():
    ramp = (-0.8 + 0.1 * np.arange(12, dtype=np.float64))[:, None, None, None] * np.ones((1, 4, 4, 3))
    assert flicker(ramp) == pytest.approx(0.0, abs=1e-12)
    a = 0.3
    alternating = np.where(np.arange(9) % 2 == 0, a, -a)[:, None, None, None] * np.ones((1, 4, 4, 3))
    assert flicker(alternating) == pytest.approx(4 * a)
    # Two constant shots (0, then 1 from frame 3): triples centred on 2 and 3 step by 1, the other two by 0.
    shots = np.where(np.arange(6) < 3, 0.0, 1.0)[:, None, None, None] * np.ones((1, 2, 2, 3))
    assert flicker(shots) == pytest.approx(0.5)
    assert flicker(shots, cuts=[3]) == 0.0  # the triples across the cut are left out
    assert math.isnan(flicker(shots[:2])) and math.isnan(flicker(shots[:4], cuts=[2]))


def test_flicker_of_a_cross_fade_is_zero():
    frames = make_movie(1, [16], 32, 32).frames
    faded = crossfade(frames, [0, 15])  # a linear blend from frame 0 to frame 15
    assert flicker(faded) == pytest.approx(0.0, abs=1e-6)
    assert flicker(frames) > 1e-4  # the true clip's moving shapes step pixel by pixel


# ------------------------------------------------------------------------------------------------
# Curves


def test_keyframe_distance_by_hand():
    assert keyframe_distance(10, [0, 6]).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert keyframe_distance(5, [4]).tolist() == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="outside the clip"):
        keyframe_distance(5, [5])
    with pytest.raises(ValueError, match="at least one keyframe"):
        keyframe_distance(5, [])


def test_distance_curve_known_answer():
    reference = make_movie(2, [13], 32, 32).frames
    distance = keyframe_distance(13, [0, 6, 12])  # [0 1 2 3 2 1 0 1 2 3 2 1 0]
    video = reference.copy()
    video[distance == 2] += 0.02  # an error of exactly 0.02 per pixel: 40 dB
    row = {"distance": distance, "psnr": psnr(video, reference, axis=(1, 2, 3)), "ssim": 1.0 - 0.1 * distance}
    curve = distance_curve([row])
    assert curve["distance"] == [0, 1, 2, 3] and curve["frames"] == [3, 4, 4, 2]
    assert curve["psnr"][0] == curve["psnr"][1] == curve["psnr"][3] == MAX_PSNR  # exact frames, capped
    assert curve["psnr"][2] == pytest.approx(40.0, abs=1e-3)
    assert curve["ssim"] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert all(math.isnan(v) for v in curve["lpips"])  # no row has LPIPS
    # A second case pools frame by frame; its NaN LPIPS frames are left out of the mean.
    second = {"distance": keyframe_distance(4, [0]), "psnr": np.full(4, 30.0),
              "lpips": np.array([0.0, np.nan, 0.2, 0.4])}
    pooled = distance_curve([row, second])
    assert pooled["frames"] == [4, 5, 5, 3]
    assert pooled["psnr"][1] == pytest.approx((4 * MAX_PSNR + 30.0) / 5)
    assert pooled["ssim"] == curve["ssim"]  # the second case has no SSIM
    assert math.isnan(pooled["lpips"][1]) and pooled["lpips"][2:] == pytest.approx([0.2, 0.4])
    json.dumps(pooled)


def test_distance_curve_bad_rows():
    with pytest.raises(ValueError, match="frames but its distance"):
        distance_curve([{"distance": np.arange(3), "psnr": np.zeros(4)}])
    with pytest.raises(ValueError, match="at least one case"):
        distance_curve([])


# ------------------------------------------------------------------------------------------------
# FVD bootstrap


def gaussian_sets(n: int, dim: int = 8, shift: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two independent (n, dim) samples of N(0, I) and N(shift, I): a Fréchet distance of dim * shift^2."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + shift


def test_bootstrap_is_deterministic_in_its_seed():
    a, b = gaussian_sets(100)
    first = bootstrap_interval(a, b, samples=50, seed=3)
    assert first == bootstrap_interval(a, b, samples=50, seed=3)
    assert first != bootstrap_interval(a, b, samples=50, seed=4)
    # The same draws at two confidences: the 50% range lies within the 95% range.
    inner = bootstrap_interval(a, b, samples=50, seed=3, confidence=0.5)
    assert first[0] <= inner[0] <= inner[1] <= first[1]


def test_bootstrap_separates_distributions_and_narrows_with_clips():
    same = bootstrap_interval(*gaussian_sets(200), samples=100)
    shifted = bootstrap_interval(*gaussian_sets(200, shift=1.0), samples=100)  # true distance 8
    assert 0.0 <= same[0] <= same[1] < 2.0 < 5.0 < shifted[0] <= shifted[1] < 12.0
    # The point estimate of the shifted sets lies inside their interval.
    assert shifted[0] <= feature_frechet_distance(*gaussian_sets(200, shift=1.0)) <= shifted[1]
    few = bootstrap_interval(*gaussian_sets(40, shift=1.0), samples=100)
    assert few[1] - few[0] > shifted[1] - shifted[0]


def test_bootstrap_bad_inputs_and_min_clips():
    a, b = gaussian_sets(10)
    with pytest.raises(ValueError, match="one D"):
        bootstrap_interval(a, b[:, :4])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(a, b, confidence=1.0)
    assert isinstance(FVD_MIN_CLIPS, int) and FVD_MIN_CLIPS >= 2


def test_paired_bootstrap_resamples_the_cases_of_both_sets_together():
    """Generated clip i belongs with true clip i: a set against itself stays at 0 under every resample and a
    shifted copy (every row + d, so every resample's means differ by exactly d) gives an interval around |d|^2."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    assert bootstrap_interval(a, a, samples=30, paired=True) == pytest.approx((0.0, 0.0), abs=1e-9)  # eigh round-off
    assert bootstrap_interval(a, a, samples=30)[1] > 0.0  # unpaired resamples differ
    shift = np.full(6, 0.5)
    low, high = bootstrap_interval(a, a + shift, samples=30, paired=True)
    assert (low, high) == pytest.approx((float(shift @ shift),) * 2, abs=1e-6)
    with pytest.raises(ValueError, match="paired bootstrap needs sets of one length"):
        bootstrap_interval(a, a[:10], paired=True)
