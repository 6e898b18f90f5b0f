"""Image and video metrics on [-1, 1] frames."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB for [-1, 1] data (peak-to-peak 2); ``inf`` when identical."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    mse = np.mean(np.square(a - b), axis=axis)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(4.0 / mse)
