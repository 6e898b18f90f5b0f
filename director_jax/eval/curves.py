"""Fidelity against distance to the nearest keyframe: where between its keyframes does a model drift?

A keyframe-conditioned model should be exact at a keyframe and least certain halfway between two,
so one mean PSNR over a clip mixes frames of very different difficulty (and timelines with dense
keyframes look better for no merit of the model). The curve splits the per-frame scores by

    distance(t) = min over keyframes k of |t - k|   (frames; 0 at the keyframes themselves)

and averages each metric over all frames of all cases at each distance. PSNR is capped at
``temporal.MAX_PSNR`` before averaging (an exact frame would otherwise make the mean infinite);
NaN scores (a metric that did not run) are left out of their mean, and a distance with no finite
score of a metric has NaN there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from director_jax.eval.temporal import MAX_PSNR

CURVE_METRICS = ("psnr", "ssim", "lpips")


def keyframe_distance(num_frames: int, keyframes: Iterable[int]) -> np.ndarray:
    """(num_frames,) int: for each frame, the distance in frames to the nearest keyframe."""
    keys = np.asarray(sorted({int(k) for k in keyframes}), int)
    if not keys.size:
        raise ValueError("a keyframe distance needs at least one keyframe.")
    if keys[0] < 0 or keys[-1] >= num_frames:
        raise ValueError(f"keyframes {keys.tolist()} lie outside the clip of {num_frames} frames.")
    return np.abs(np.arange(num_frames)[:, None] - keys[None, :]).min(axis=1)


def distance_curve(rows: Iterable[Mapping[str, np.ndarray]]) -> dict[str, list]:
    """Per-distance frame counts and mean metrics over cases (see the module doc).

    Each row holds per-frame arrays of one case: ``distance`` (from ``keyframe_distance``) and any of
    ``psnr``, ``ssim``, ``lpips`` of the same length. Returns JSON-able lists indexed by distance:
    ``{"distance": [0, 1, ...], "frames": [count, ...], "psnr": [...], "ssim": [...], "lpips": [...]}``
    (a metric no row has is all NaN).
    """
    rows = list(rows)
    distances = [np.asarray(r["distance"], int).reshape(-1) for r in rows]
    if not rows or not sum(d.size for d in distances):
        raise ValueError("a distance curve needs at least one case with frames.")
    if min(int(d.min()) for d in distances if d.size) < 0:
        raise ValueError("keyframe distances must be >= 0.")
    size = max(int(d.max()) for d in distances if d.size) + 1
    frames = sum(np.bincount(d, minlength=size) for d in distances)
    out: dict[str, list] = {"distance": list(range(size)), "frames": [int(n) for n in frames]}
    for name in CURVE_METRICS:
        total, count = np.zeros(size), np.zeros(size)
        for row, d in zip(rows, distances, strict=True):
            if name not in row:
                continue
            v = np.asarray(row[name], np.float64).reshape(-1)
            if v.shape != d.shape:
                raise ValueError(f"a row's {name} has {v.size} frames but its distance has {d.size}.")
            if name == "psnr":
                v = np.minimum(v, MAX_PSNR)
            ok = np.isfinite(v)
            total += np.bincount(d[ok], weights=v[ok], minlength=size)
            count += np.bincount(d[ok], minlength=size)
        out[name] = [float(x) for x in np.where(count > 0, total / np.maximum(count, 1), np.nan)]
    return out
