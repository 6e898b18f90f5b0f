"""SSIM (Wang et al. 2004) of [-1, 1] frames, via ``dm_pix.ssim`` on frames mapped to [0, 1].

dm-pix follows ``tf.image.ssim``: an 11-tap Gaussian window (sigma 1.5), "valid" filtering (no
padding, so frames need at least 11 pixels a side), K1 = 0.01, K2 = 0.03, data range 1, the map
averaged over pixels and the three colour channels (SSIM on RGB, not on luma).
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

WINDOW = 11


@jax.jit
def _ssim01(a: jax.Array, b: jax.Array) -> jax.Array:
    return dm_pix.ssim((a + 1.0) * 0.5, (b + 1.0) * 0.5, max_val=1.0, filter_size=WINDOW, filter_sigma=1.5)


def ssim(a: np.ndarray | jax.Array, b: np.ndarray | jax.Array) -> np.ndarray:
    """Per-image SSIM (N,) of two (N, H, W, 3) batches in [-1, 1]; 1 for identical images."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"SSIM needs two (N, H, W, C) image batches of one shape; got {a.shape} and {b.shape}.")
    if min(a.shape[1:3]) < WINDOW:
        raise ValueError(f"SSIM's {WINDOW}x{WINDOW} window needs images of at least {WINDOW} pixels a side; "
                         f"got {a.shape[1]}x{a.shape[2]}.")
    return np.asarray(_ssim01(a, b), np.float64)


def video_ssim(a: np.ndarray | jax.Array, b: np.ndarray | jax.Array) -> np.ndarray:
    """Per-clip SSIM (B,) of (B, T, H, W, 3) clips in [-1, 1]: the mean over frames."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 5:
        raise ValueError(f"video SSIM needs two (B, T, H, W, C) clips of one shape; got {a.shape} and {b.shape}.")
    return ssim(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])).reshape(a.shape[:2]).mean(axis=1)
