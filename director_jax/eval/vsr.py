"""Video super-resolution metrics on 8-bit frames, as the VSR benchmarks (BasicSR) compute them.

Every method's output is rounded to uint8 first (what a saved PNG holds), then compared with the
high-res truth (uint8):

* ``psnr_y``: BasicSR's ``calculate_psnr(test_y_channel=True)``: ``crop_border`` pixels dropped on
  each side, the luma of ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` (Y = 16 + 65.481 R + 128.553 G +
  24.966 B with R, G, B in [0, 1], on the 0..255 scale, **not rounded**), PSNR with peak 255.
  ``inf`` for identical frames (as BasicSR). BasicSR works in float32 up to the MSE; this uses
  float64 throughout (differences of ~1e-5 dB).
* ``psnr_rgb``: the same on the three RGB channels (one MSE over all of them).
* ``ssim_y``: BasicSR's ``calculate_ssim(test_y_channel=True)``: SSIM on that unrounded Y (0..255)
  with an 11x11 Gaussian window of sigma 1.5 (``cv2.getGaussianKernel``), "valid" filtering (the 5
  border pixels of the filtered maps dropped), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2. Not the
  dm-pix SSIM of ``eval/ssim.py``, which averages RGB channels; this is the number VSR papers report.
* ``lpips``: LPIPS (``models/lpips.py``, AlexNet by default) on the whole RGB frame (no border crop),
  as BasicSR's ``calculate_lpips.py`` does.

Averages follow the benchmarks' convention: the mean over the frames of a sequence, then the mean
over sequences (so a long sequence counts as much as a short one). For averaging, a frame's PSNR is
capped at ``MAX_PSNR`` dB so one identical frame does not make a sequence's mean infinite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from director_jax.models.lpips import default_lpips

METRICS = ("psnr_y", "psnr_rgb", "ssim_y", "lpips")
BETTER = {"psnr_y": "higher", "psnr_rgb": "higher", "ssim_y": "higher", "lpips": "lower"}
MAX_PSNR = 100.0
SSIM_WINDOW = 11
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float64)  # R, G, B (BasicSR's bgr2ycbcr reversed)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim < 3 or a.shape[-1] != 3:
        raise ValueError(f"VSR metrics compare two RGB images (..., H, W, 3) of one shape; got {a.shape} and "
                         f"{b.shape}.")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"VSR metrics take uint8 images (0..255), as the benchmarks' PNGs; got {a.dtype} and "
                         f"{b.dtype}.")
    return a, b


def crop(img: np.ndarray, border: int) -> np.ndarray:
    """``img[..., border:-border, border:-border, :]`` (BasicSR's ``crop_border``); 0 keeps the image."""
    if border < 0:
        raise ValueError(f"crop_border={border}: give 0 or more pixels.")
    if border == 0:
        return img
    if min(img.shape[-3:-1]) <= 2 * border:
        raise ValueError(f"crop_border={border} leaves nothing of a {img.shape[-3]}x{img.shape[-2]} image.")
    return img[..., border:-border, border:-border, :]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> float64 BT.601 luma on the 0..255 scale (16..235), unrounded (MATLAB's rgb2ycbcr)."""
    return 16.0 + np.asarray(img, np.float64) @ _Y_WEIGHTS / 255.0


def _psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    axes = tuple(range(a.ndim - 3, a.ndim)) if a.ndim >= 3 else None
    mse = np.mean(np.square(a - b), axis=axes)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0 * 255.0 / mse)


def psnr_y(a: np.ndarray, b: np.ndarray, crop_border: int = 0) -> np.ndarray:
    """PSNR (dB) on the luma of uint8 RGB images (..., H, W, 3), ``crop_border`` pixels cropped: shape (...)."""
    a, b = _check_pair(a, b)
    ya, yb = rgb_to_y(crop(a, crop_border)), rgb_to_y(crop(b, crop_border))
    return _psnr(ya[..., None], yb[..., None])


def psnr_rgb(a: np.ndarray, b: np.ndarray, crop_border: int = 0) -> np.ndarray:
    """PSNR (dB) over the RGB channels of uint8 images (..., H, W, 3), ``crop_border`` pixels cropped."""
    a, b = _check_pair(a, b)
    return _psnr(crop(a, crop_border).astype(np.float64), crop(b, crop_border).astype(np.float64))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian of ``cv2.getGaussianKernel(size, sigma)`` (float64)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-np.square(x) / (2 * sigma * sigma))
    return k / k.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation of (..., H, W) with ``kernel`` x ``kernel``, "valid" part only (no padding)."""
    n = len(kernel)
    h, w = img.shape[-2:]
    rows = sum(kernel[i] * img[..., i:h - n + 1 + i, :] for i in range(n))
    return sum(kernel[i] * rows[..., :, i:w - n + 1 + i] for i in range(n))


def ssim_y(a: np.ndarray, b: np.ndarray, crop_border: int = 0) -> np.ndarray:
    """BasicSR's SSIM on the luma of uint8 RGB images (..., H, W, 3), ``crop_border`` pixels cropped: shape (...)."""
    a, b = _check_pair(a, b)
    x, y = rgb_to_y(crop(a, crop_border)), rgb_to_y(crop(b, crop_border))
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window needs at least {SSIM_WINDOW} pixels a side after "
                         f"the border crop; got {x.shape[-2]}x{x.shape[-1]}.")
    k = gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = _filter_valid(x, k), _filter_valid(y, k)
    s11 = _filter_valid(x * x, k) - mu1 * mu1
    s22 = _filter_valid(y * y, k) - mu2 * mu2
    s12 = _filter_valid(x * y, k) - mu1 * mu2
    ssim_map = (2 * mu1 * mu2 + c1) * (2 * s12 + c2) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2))
    return ssim_map.mean(axis=(-2, -1))


def lpips(a: np.ndarray, b: np.ndarray, net: str = "alexnet") -> np.ndarray:
    """LPIPS (T,) of uint8 frames (T, H, W, 3), one frame at a time (one compile per frame size, bounded memory)."""
    a, b = _check_pair(a, b)
    model = default_lpips(net)
    scale = np.float32(1 / 127.5)
    return np.array([float(model(x[None].astype(np.float32) * scale - 1, y[None].astype(np.float32) * scale - 1)[0])
                     for x, y in zip(a, b, strict=True)], np.float64)


def frame_metrics(video: np.ndarray, truth: np.ndarray, *, crop_border: int, lpips_net: str = "alexnet"
                  ) -> dict[str, np.ndarray]:
    """Per-frame ``METRICS`` (each (T,)) of a uint8 video (T, H, W, 3) against the truth; ``lpips_net=""``: NaN."""
    video, truth = _check_pair(video, truth)
    out = {"psnr_y": psnr_y(video, truth, crop_border), "psnr_rgb": psnr_rgb(video, truth, crop_border),
           "ssim_y": ssim_y(video, truth, crop_border)}
    out["lpips"] = lpips(video, truth, lpips_net) if lpips_net else np.full(len(video), np.nan)
    return out


def mean_frames(per_frame: Mapping[str, np.ndarray], frames: Iterable[int] | None = None) -> dict[str, float]:
    """The mean of each metric over ``frames`` (default all) of one sequence, PSNR capped at ``MAX_PSNR``."""
    out = {}
    for name in METRICS:
        values = np.asarray(per_frame[name], np.float64)
        if frames is not None:
            values = values[np.asarray(list(frames), int)]
        if name.startswith("psnr"):
            values = np.minimum(values, MAX_PSNR)
        out[name] = float(np.mean(values)) if len(values) else float("nan")
    out["frames"] = int(len(values))
    return out


def mean_sequences(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The mean of per-sequence means (sequences without frames left out), and the frame and sequence counts."""
    rows = [r for r in rows if r.get("frames", 0)]
    out = {}
    for name in METRICS:
        values = [r[name] for r in rows if np.isfinite(r[name])]
        out[name] = float(np.mean(values)) if values else float("nan")
    out["frames"] = int(sum(r["frames"] for r in rows))
    out["sequences"] = len(rows)
    return out
