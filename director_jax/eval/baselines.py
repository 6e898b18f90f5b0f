"""Baselines that need no model, evaluated exactly like generated videos."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def crossfade(reference: np.ndarray, given_frames: Sequence[int]) -> np.ndarray:
    """The cross-fade baseline of a timeline: given frames kept, frames between two given frames a linear blend.

    Frame t between given frames a < t < b is ``(1 - w) x[a] + w x[b]`` with ``w = (t - a) / (b - a)``;
    before the first given frame the first is held, after the last the last. ``reference``
    (T, H, W, C) supplies the given frames only (the same frames a model is given).
    """
    reference = np.asarray(reference, np.float32)
    given = sorted({int(g) for g in given_frames})
    if not given:
        raise ValueError("the cross-fade baseline needs at least one given frame (a keyframe).")
    if given[0] < 0 or given[-1] >= len(reference):
        raise ValueError(f"given frames {given} lie outside the clip of {len(reference)} frames.")
    out = np.empty_like(reference)
    out[:given[0] + 1] = reference[given[0]]
    out[given[-1]:] = reference[given[-1]]
    for a, b in zip(given, given[1:], strict=False):
        w = ((np.arange(a, b + 1) - a) / (b - a)).astype(np.float32)[:, None, None, None]
        out[a:b + 1] = (1 - w) * reference[a] + w * reference[b]
    return out
