"""Object-trajectory error on synthetic clips: where the generated objects are vs. where they truly are.

Synthetic shots (``data/synthetic.py``) are shapes of known flat colours moving over a known
vertical-gradient background, with every shape's centre known per frame. In a generated frame each
pixel is labelled with the nearest (Euclidean RGB) of the shot's colours: the background at that
row or one of the shapes. A shape's position is the centroid of its pixels (pixel centres at
i + 0.5, the renderer's coordinates); with one shape per shot the rule is "alpha > 1/2", so the
centroid of a rendered frame is its true centre to a fraction of a pixel. The error is the
Euclidean distance in pixels; a shape with no pixel of its colour counts as the frame's diagonal
(the worst possible miss) and is also reported as missing. Occlusion between shapes of one shot
moves a centroid, so suites meant for this metric use one shape per shot (``max_shapes=1``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from director_jax.data.synthetic import ShotSpec


@dataclasses.dataclass(frozen=True)
class ObjectTruth:
    """Ground truth of a clip: per frame, K shape centres (NaN: no such shape in this shot), colours, background."""

    centers: np.ndarray  # (T, K, 2) float (y, x) pixels
    colors: np.ndarray  # (T, K, 3) RGB in [-1, 1]
    background: np.ndarray  # (T, 2, 3): top and bottom colour of the vertical gradient

    @classmethod
    def from_shots(cls, specs: Sequence[ShotSpec], centers: Sequence[np.ndarray], shot_of_frame: Sequence[int],
                   frame_in_shot: Sequence[int]) -> ObjectTruth:
        """Per-frame truth of a clip whose frame i is frame ``frame_in_shot[i]`` of shot ``shot_of_frame[i]``."""
        k = max(len(specs[s].shapes) for s in set(shot_of_frame))
        t = len(shot_of_frame)
        out_c = np.full((t, k, 2), np.nan)
        out_col = np.zeros((t, k, 3))
        out_bg = np.zeros((t, 2, 3))
        for i, (s, f) in enumerate(zip(shot_of_frame, frame_in_shot, strict=True)):
            spec = specs[s]
            n = len(spec.shapes)
            out_c[i, :n] = centers[s][f]
            out_col[i, :n] = [shape["color"] for shape in spec.shapes]
            out_bg[i] = [spec.background_top, spec.background_bottom]
        return cls(out_c, out_col, out_bg)


def object_centroids(frame: np.ndarray, colors: np.ndarray, top: np.ndarray, bottom: np.ndarray,
                     present: np.ndarray | None = None) -> np.ndarray:
    """(K, 2) centroids (y, x) of the pixels nearest to each shape colour in one (H, W, 3) frame; NaN if none."""
    frame = np.asarray(frame, np.float64)
    h, w, _ = frame.shape
    frac = ((np.arange(h) + 0.5) / h)[:, None, None]
    background = np.broadcast_to((1 - frac) * np.asarray(top) + frac * np.asarray(bottom), frame.shape)
    present = np.ones(len(colors), bool) if present is None else np.asarray(present, bool)
    candidates = [background] + [np.broadcast_to(np.asarray(c, np.float64), frame.shape) for c in colors]
    dist = np.stack([np.sum((frame - c) ** 2, axis=-1) for c in candidates])
    dist[1:][~present] = np.inf
    label = np.argmin(dist, axis=0)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.full((len(colors), 2), np.nan)
    for k in range(len(colors)):
        mask = label == k + 1
        if present[k] and mask.any():
            out[k] = yy[mask].mean(), xx[mask].mean()
    return out


def trajectory_error(video: np.ndarray, truth: ObjectTruth, frames: Sequence[int] | None = None) -> dict[str, float]:
    """Mean centroid error in pixels over ``frames`` (default all) and the shapes present, plus the missing fraction.

    Returns ``{"trajectory_error_px", "object_missing_fraction"}``; a missing shape counts as the diagonal.
    """
    video = np.asarray(video)
    if video.ndim != 4 or len(video) != len(truth.centers):
        raise ValueError(f"video {video.shape} must be (T, H, W, 3) with T = {len(truth.centers)} truth frames.")
    frames = range(len(video)) if frames is None else list(frames)
    diagonal = float(np.hypot(*video.shape[1:3]))
    errors, missing = [], 0
    for t in frames:
        present = ~np.isnan(truth.centers[t, :, 0])
        found = object_centroids(video[t], truth.colors[t], truth.background[t, 0], truth.background[t, 1], present)
        for k in np.flatnonzero(present):
            if np.isnan(found[k, 0]):
                errors.append(diagonal)
                missing += 1
            else:
                errors.append(float(np.hypot(*(found[k] - truth.centers[t, k]))))
    if not errors:
        return {"trajectory_error_px": float("nan"), "object_missing_fraction": float("nan")}
    return {"trajectory_error_px": float(np.mean(errors)), "object_missing_fraction": missing / len(errors)}
