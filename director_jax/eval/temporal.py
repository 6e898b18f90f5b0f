"""Temporal consistency of a clip without optical flow: statistics of consecutive-frame differences.

* ``consecutive_psnr``: mean PSNR between frames t and t+1 (higher = smoother; a frozen clip is
  perfectly smooth, so read it next to the reference clip's value).
* ``motion``: mean absolute change between consecutive frames (the clip's motion energy).
* ``temporal_error``: mean |(g[t+1] - g[t]) - (r[t+1] - r[t])| between a clip g and its reference r:
  how far the frame-to-frame changes are from the true ones (flicker, jumps, frozen motion all
  count); 0 for the reference itself. This is a warping-free stand-in for flow-warped errors.
* ``flicker``: mean |x[t+1] - 2 x[t] + x[t-1]| over pixels and frame triples, the temporal second
  difference: 0 for anything that changes at a constant rate (a linear fade, a steady brightness
  ramp), large for changes that reverse from frame to frame (4a for frames alternating +a / -a).
  Needs no reference, unlike ``temporal_error``; a moving edge still counts (a pixel steps as it passes).

Pairs (triples) that straddle a shot cut (a frame listed in ``cuts`` and the one before it) are left
out: a hard cut is content, not inconsistency. Values are per clip, float64, on [-1, 1] frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from director_jax.eval.metrics import psnr

MAX_PSNR = 100.0  # dB reported for identical frames, so means and JSON stay finite


def _pairs(num_frames: int, cuts: Sequence[int]) -> np.ndarray:
    """Indices t of the pairs (t, t+1) inside one shot."""
    cut = set(int(c) for c in cuts)
    return np.asarray([t for t in range(num_frames - 1) if t + 1 not in cut], int)


def _triples(num_frames: int, cuts: Sequence[int]) -> np.ndarray:
    """Indices t of the triples (t-1, t, t+1) inside one shot."""
    cut = set(int(c) for c in cuts)
    return np.asarray([t for t in range(1, num_frames - 1) if t not in cut and t + 1 not in cut], int)


def _check(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video, np.float64)
    if video.ndim != 4:
        raise ValueError(f"temporal metrics take one (T, H, W, C) clip; got shape {video.shape}.")
    return video


def consecutive_psnr(video: np.ndarray, cuts: Sequence[int] = ()) -> float:
    """Mean PSNR (dB, capped at MAX_PSNR) between consecutive frames of a (T, H, W, C) clip."""
    video = _check(video)
    t = _pairs(len(video), cuts)
    if not len(t):
        return float("nan")
    values = psnr(video[t], video[t + 1], axis=(1, 2, 3))
    return float(np.mean(np.minimum(values, MAX_PSNR)))


def motion(video: np.ndarray, cuts: Sequence[int] = ()) -> float:
    """Mean |frame[t+1] - frame[t]| over the consecutive pairs inside shots."""
    video = _check(video)
    t = _pairs(len(video), cuts)
    return float(np.mean(np.abs(video[t + 1] - video[t]))) if len(t) else float("nan")


def temporal_error(video: np.ndarray, reference: np.ndarray, cuts: Sequence[int] = ()) -> float:
    """Mean |(g[t+1] - g[t]) - (r[t+1] - r[t])|: the error of the frame-to-frame changes against the reference."""
    video, reference = _check(video), _check(reference)
    if video.shape != reference.shape:
        raise ValueError(f"clip {video.shape} and reference {reference.shape} differ in shape.")
    t = _pairs(len(video), cuts)
    if not len(t):
        return float("nan")
    return float(np.mean(np.abs((video[t + 1] - video[t]) - (reference[t + 1] - reference[t]))))


def flicker(video: np.ndarray, cuts: Sequence[int] = ()) -> float:
    """Mean |x[t+1] - 2 x[t] + x[t-1]| over the triples inside shots: frame-to-frame reversals, 0 for steady change."""
    video = _check(video)
    t = _triples(len(video), cuts)
    if not len(t):
        return float("nan")
    return float(np.mean(np.abs(video[t + 1] - 2.0 * video[t] + video[t - 1])))
