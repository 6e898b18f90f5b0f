"""Pacing adherence: does each keyframe show up at the frame the timeline asked for?

A model can reproduce a keyframe faithfully but early or late (the clip runs too fast or too slow),
which per-frame fidelity at the requested frame punishes without saying why. Here every keyframe
(an image given for frame ``k``) is looked up in the whole generated clip:

* its **landed** frame is the frame with the smallest mean squared error to it (ties go to the
  frame nearest ``k``, then the earlier one, so a frozen clip lands every keyframe where asked and
  the margin below tells that it is not distinguishable there);
* ``pacing_offset_frames``: mean |landed - k| over the keyframes (0 when every keyframe is where asked);
* ``pacing_exact_fraction``: the fraction of keyframes landed exactly at ``k``;
* ``pacing_margin_db``: mean over keyframes of PSNR(frame k) - max PSNR(any other frame), PSNR capped
  at ``temporal.MAX_PSNR``: > 0 when the requested frame is the one most like the keyframe, < 0 when
  another frame is closer (by as many dB), ~0 when neighbours are as close (a frozen or slow clip).
  NaN for a one-frame clip (no other frame).

Frames are (H, W, 3) in [-1, 1]; errors are taken in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from director_jax.eval.temporal import MAX_PSNR


def keyframe_errors(video: np.ndarray, keyframes: Mapping[int, np.ndarray]) -> tuple[list[int], np.ndarray]:
    """(requested frames sorted, MSE (K, T) of every keyframe against every frame of the clip)."""
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"pacing takes one (T, H, W, C) clip; got shape {video.shape}.")
    frames = sorted(int(k) for k in keyframes)
    if not frames:
        raise ValueError("pacing needs at least one keyframe.")
    if frames[0] < 0 or frames[-1] >= len(video):
        raise ValueError(f"keyframes at frames {frames} lie outside the clip of {len(video)} frames.")
    keys = np.stack([np.asarray(keyframes[k], np.float64) for k in frames])
    if keys.shape[1:] != video.shape[1:]:
        raise ValueError(f"keyframes are {keys.shape[1:]} but the clip's frames are {video.shape[1:]}.")
    # One frame at a time against all keyframes: memory of K frames, not K clips.
    mse = np.stack([np.mean(np.square(keys - np.asarray(f, np.float64)), axis=(1, 2, 3)) for f in video], axis=1)
    return frames, mse


def keyframe_landing(video: np.ndarray, keyframes: Mapping[int, np.ndarray]) -> dict:
    """Where each keyframe landed in a (T, H, W, 3) clip and the pacing scores (see the module doc).

    Returns JSON-able ``requested_frames``, ``landed_frames``, ``margins_db`` (lists, per keyframe in
    frame order) and the floats ``pacing_offset_frames``, ``pacing_exact_fraction``, ``pacing_margin_db``.
    """
    frames, mse = keyframe_errors(video, keyframes)
    t = np.arange(mse.shape[1])
    landed, margins = [], []
    for k, err in zip(frames, mse, strict=True):
        order = np.lexsort((t, np.abs(t - k), err))  # smallest error, then nearest to k, then earliest
        landed.append(int(order[0]))
        with np.errstate(divide="ignore"):
            db = np.minimum(10.0 * np.log10(4.0 / err), MAX_PSNR)  # metrics.psnr, from the MSE
        others = np.delete(db, k)
        margins.append(float(db[k] - others.max()) if others.size else float("nan"))
    offsets = np.abs(np.asarray(landed) - np.asarray(frames))
    finite = [m for m in margins if np.isfinite(m)]
    return {
        "requested_frames": frames,
        "landed_frames": landed,
        "margins_db": margins,
        "pacing_offset_frames": float(offsets.mean()),
        "pacing_exact_fraction": float(np.mean(offsets == 0)),
        "pacing_margin_db": float(np.mean(finite)) if finite else float("nan"),
    }

