"""Degradations that turn a high-res clip into Director-SR's low-res input: seeded, configurable, reproducible.

Director-SR restores a video from its upsampled low-res version (docs/design.md). At inference that low-res
video comes from Director-Gen, so training pairs need low-res clips at least as damaged as real ones,
not clean downscales. ``degrade`` makes them on the loader side (uint8 numpy, ``(T, H, W, 3)``) as a pure
function of the clip, the config and a seed, so a resumed run or another host sees the same pair.

Order of operations (each optional step with its own probability):

1. Gaussian blur of the high-res frames (sampled kernel of radius ``ceil(3 sigma)``, reflect-101 borders);
2. downscale by an integer ``scale`` to ``(H / scale, W / scale)`` with one of ``down_kernels`` (Pillow);
3. additive Gaussian noise, sigma in 0..255 units, independent per pixel, channel and frame;
4. JPEG compression of every frame (Pillow, 4:2:0 chroma);
5. H.264 re-encoding of the low-res clip (libx264 CRF, yuv420p, one thread, no MB-tree) and decoding it back;
6. bicubic upsampling back to ``(H, W)`` (``bicubic_upsample``: the baseline the SR model must beat).

One parameter draw per clip (``DegradationParams``): every frame gets the same blur, scale, kernel, JPEG
quality and CRF, as footage from one camera and one encoder would; only the noise differs per frame (from
``params.noise_seed``). Every step rounds to uint8, as a real pipeline does between stages.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["DegradationConfig", "DegradationParams", "DegradedClip", "degrade", "degrade_float", "sample_params",
           "apply_degradation", "bicubic_upsample", "gaussian_kernel"]

_SALT = 0x5D6A  # keeps this module's random stream apart from others seeded with the same (seed, index)
_PIL_KERNELS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS,
                "nearest": Image.Resampling.NEAREST}
_X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    """Ranges the per-clip degradation parameters are drawn from (uniformly); probabilities per clip.

    ``scales`` are integers so the low-res clip is exactly ``H / scale x W / scale`` and its latents line
    up with the high-res ones; 480x832 divides by 2 and 4 (and 8) but not by 3. The defaults follow
    Real-ESRGAN's ranges, milder in noise; tune them against what Director-Gen's output looks like.
    """

    scales: tuple[int, ...] = (2, 4)
    down_kernels: tuple[str, ...] = ("bicubic", "bilinear", "area")
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.2, 3.0)  # in high-res pixels
    noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 20.0)  # in 0..255 units, on the low-res clip
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)
    codec_prob: float = 0.3
    codec_crf: tuple[int, int] = (18, 38)  # libx264 constant rate factor: higher is worse
    codec_preset: str = "veryfast"

    def __post_init__(self) -> None:
        scales = tuple(self.scales) if isinstance(self.scales, Sequence) else (self.scales,)
        if not scales or any(not isinstance(s, int | np.integer) or isinstance(s, bool) or s < 1 for s in scales):
            raise ValueError(f"scales must be a non-empty list of integers >= 1, got {self.scales!r}.")
        object.__setattr__(self, "scales", tuple(int(s) for s in scales))
        kernels = (self.down_kernels,) if isinstance(self.down_kernels, str) else tuple(self.down_kernels)
        if not kernels or any(k not in _PIL_KERNELS for k in kernels):
            raise ValueError(f"down_kernels must be a non-empty list of {sorted(_PIL_KERNELS)}, "
                             f"got {self.down_kernels!r}.")
        object.__setattr__(self, "down_kernels", kernels)
        for name in ("blur_prob", "noise_prob", "jpeg_prob", "codec_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} is a probability; got {p}.")
        _set_range(self, "blur_sigma", float, lo=0.0, lo_open=True)
        _set_range(self, "noise_sigma", float, lo=0.0)
        _set_range(self, "jpeg_quality", int, lo=1, hi=100)
        _set_range(self, "codec_crf", int, lo=0, hi=51)
        if self.codec_preset not in _X264_PRESETS:
            raise ValueError(f"codec_preset={self.codec_preset!r}; choose one of {_X264_PRESETS}.")

    @classmethod
    def resize_only(cls, scale: int) -> DegradationConfig:
        """Plain bicubic down and up by ``scale``: the clean baseline (and an easy case to check)."""
        return cls(scales=(scale,), down_kernels=("bicubic",), blur_prob=0.0, noise_prob=0.0, jpeg_prob=0.0,
                   codec_prob=0.0)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> DegradationConfig:
        """Reads the fields present in an ml_collections ConfigDict (or a dict); other keys are ignored."""
        items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in items.items() if k in names}, **overrides})


def _set_range(cfg: DegradationConfig, name: str, kind: type, lo: float, hi: float = math.inf,
               lo_open: bool = False) -> None:
    value = getattr(cfg, name)
    try:
        a, b = value
        if kind is int and any(isinstance(x, bool) or float(x) != int(x) for x in (a, b)):
            raise TypeError
        a, b = kind(a), kind(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a ({kind.__name__} low, {kind.__name__} high) pair, got {value!r}.") from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b or (a <= lo if lo_open else a < lo) or b > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi < math.inf else "")
        raise ValueError(f"{name}={value!r}: need low <= high, both finite and {bound}.")
    object.__setattr__(cfg, name, (a, b))


@dataclasses.dataclass(frozen=True)
class DegradationParams:
    """What one clip got; ``None`` marks a step not applied. With the clip, it reproduces the output exactly."""

    scale: int
    down_kernel: str = "bicubic"
    blur_sigma: float | None = None
    noise_sigma: float | None = None
    noise_seed: int = 0
    jpeg_quality: int | None = None
    codec_crf: int | None = None
    codec_preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.scale < 1 or self.down_kernel not in _PIL_KERNELS or self.codec_preset not in _X264_PRESETS:
            raise ValueError(f"bad degradation params {self}: scale >= 1, down_kernel in {sorted(_PIL_KERNELS)}, "
                             f"codec_preset in {_X264_PRESETS}.")
        if (self.blur_sigma is not None and not self.blur_sigma > 0) or (
                self.noise_sigma is not None and not self.noise_sigma >= 0):
            raise ValueError(f"blur_sigma must be > 0 and noise_sigma >= 0 (or None); got {self}.")
        if (self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100) or (
                self.codec_crf is not None and not 0 <= self.codec_crf <= 51):
            raise ValueError(f"jpeg_quality must be in 1..100 and codec_crf in 0..51 (or None); got {self}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, for logs and metadata."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DegradedClip:
    """``lowres`` (T, H/s, W/s, 3), ``upsampled`` (T, H, W, 3) or None, and the parameters used."""

    lowres: np.ndarray
    upsampled: np.ndarray | None
    params: DegradationParams


RngOrSeed = int | Sequence[int] | np.random.Generator | np.random.SeedSequence


def _generator(rng_or_seed: RngOrSeed) -> np.random.Generator:
    """A Generator is used (and advanced) as is; ints (e.g. ``(seed, index)``) seed a salted SeedSequence."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return np.random.default_rng(rng_or_seed)
    key = [rng_or_seed] if isinstance(rng_or_seed, int | np.integer) else list(rng_or_seed)
    if any(isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0 for k in key):
        raise ValueError(f"a seed is an int >= 0, a sequence of them (e.g. (seed, index)) or a np.random.Generator; "
                         f"got {rng_or_seed!r}.")
    return np.random.default_rng(np.random.SeedSequence([_SALT, *(int(k) for k in key)]))


def _pick(options: Sequence, u: float):
    return options[min(int(u * len(options)), len(options) - 1)]


def sample_params(config: DegradationConfig, rng_or_seed: RngOrSeed) -> DegradationParams:
    """One clip's parameters. Always the same draws in the same order, so toggling one step moves no other."""
    rng = _generator(rng_or_seed)
    u = rng.random(10)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    (b_lo, b_hi), (n_lo, n_hi) = config.blur_sigma, config.noise_sigma
    (q_lo, q_hi), (c_lo, c_hi) = config.jpeg_quality, config.codec_crf
    return DegradationParams(
        scale=_pick(config.scales, u[0]),
        down_kernel=_pick(config.down_kernels, u[1]),
        blur_sigma=float(b_lo + u[3] * (b_hi - b_lo)) if u[2] < config.blur_prob else None,
        noise_sigma=float(n_lo + u[5] * (n_hi - n_lo)) if u[4] < config.noise_prob else None,
        noise_seed=noise_seed,
        jpeg_quality=_pick(range(q_lo, q_hi + 1), u[7]) if u[6] < config.jpeg_prob else None,
        codec_crf=_pick(range(c_lo, c_hi + 1), u[9]) if u[8] < config.codec_prob else None,
        codec_preset=config.codec_preset,
    )


def _check_clip(clip: Any, scales: Sequence[int]) -> np.ndarray:
    if not isinstance(clip, np.ndarray):
        raise TypeError(f"clip must be a numpy array, got {type(clip).__name__}.")
    if clip.dtype != np.uint8:
        raise TypeError(f"clip must be uint8 in [0, 255], got {clip.dtype}; for [-1, 1] floats use degrade_float.")
    if clip.ndim != 4 or clip.shape[-1] != 3 or min(clip.shape[:3]) < 1:
        raise ValueError(f"clip must be one RGB clip (T, H, W, 3) with T, H, W >= 1, got shape {clip.shape}; "
                         "degrade a batch one clip at a time (each with its own seed).")
    h, w = clip.shape[1:3]
    bad = [s for s in scales if h % s or w % s]
    if bad:
        m = math.lcm(*scales)
        raise ValueError(f"clip frames are {h}x{w}, not divisible by scale {bad[0]} (scales {tuple(scales)}): crop "
                         f"to a multiple of {m} first, e.g. clip[:, :{h - h % m}, :{w - w % m}] or a centre crop of "
                         "that size.")
    return np.ascontiguousarray(clip)


def _resize(clip: np.ndarray, height: int, width: int, kernel: str) -> np.ndarray:
    out = np.empty((clip.shape[0], height, width, 3), np.uint8)
    for i, frame in enumerate(clip):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), _PIL_KERNELS[kernel]))
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalised sampled Gaussian of radius ``ceil(3 sigma)`` (float32) that the blur step uses."""
    r = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(clip: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, frame by frame; OpenCV (a PySceneDetect dependency) is ~8x faster than scipy here."""
    import cv2

    k = gaussian_kernel(sigma)
    if len(k) > 2 * min(clip.shape[1:3]) - 1:
        raise ValueError(f"blur_sigma={sigma} needs a kernel of {len(k)} taps, too wide for {clip.shape[1:3]} frames.")
    out = np.empty_like(clip)
    for i, frame in enumerate(clip):
        blurred = cv2.sepFilter2D(frame, cv2.CV_32F, k, k, borderType=cv2.BORDER_REFLECT_101)
        out[i] = np.clip(np.rint(blurred), 0, 255)
    return out


def _add_noise(clip: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(clip.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    noise += clip
    return np.clip(np.rint(noise, out=noise), 0, 255, out=noise).astype(np.uint8)


def _jpeg(clip: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(clip)
    for i, frame in enumerate(clip):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0")
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _codec(clip: np.ndarray, crf: int, preset: str) -> np.ndarray:
    """libx264 encode and h264 decode in memory, one thread each.

    MB-tree rate control is off: with it, x264 gave different bytes for the same input depending on what the
    process had done before (seen on 32x32 and 64x64 clips; heap-dependent), which breaks "same seed, same
    bytes". Without it the output was stable over hundreds of perturbed runs and all presets tried.
    """
    import av

    t, h, w, _ = clip.shape
    padded = np.pad(clip, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sizes
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = padded.shape[2], padded.shape[1], "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, 24), Fraction(24)
    enc.thread_count = 1
    enc.options = {"crf": str(int(crf)), "preset": preset, "x264-params": "mbtree=0"}
    dec = av.CodecContext.create("h264", "r")
    dec.thread_count = 1
    packets = []
    for i, frame in enumerate(padded):
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts = i
        packets += enc.encode(vf)
    packets += enc.encode(None)
    frames = [f.to_ndarray(format="rgb24") for p in [*packets, None] for f in dec.decode(p)]
    if len(frames) != t:
        raise RuntimeError(f"H.264 round trip gave {len(frames)} frames for {t}.")
    return np.stack(frames)[:, :h, :w]


def bicubic_upsample(lowres: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (T, h, w, 3) -> (T, h * scale, w * scale, 3), Pillow bicubic: exactly ``degrade``'s upsampled clip."""
    lowres = _check_clip(lowres, ())
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}.")
    _, h, w, _ = lowres.shape
    return lowres.copy() if scale == 1 else _resize(lowres, h * scale, w * scale, "bicubic")


def apply_degradation(clip: np.ndarray, params: DegradationParams, *, upsample: bool = True) -> DegradedClip:
    """The degradation ``params`` describe, in the module's order; deterministic (noise from ``noise_seed``)."""
    x = _check_clip(clip, (params.scale,))
    _, h, w, _ = x.shape
    if params.blur_sigma is not None:
        x = _blur(x, params.blur_sigma)
    if params.scale > 1:
        x = _resize(x, h // params.scale, w // params.scale, params.down_kernel)
    if params.noise_sigma is not None:
        x = _add_noise(x, params.noise_sigma, params.noise_seed)
    if params.jpeg_quality is not None:
        x = _jpeg(x, params.jpeg_quality)
    if params.codec_crf is not None:
        x = _codec(x, params.codec_crf, params.codec_preset)
    if x is clip:
        x = x.copy()
    return DegradedClip(x, bicubic_upsample(x, params.scale) if upsample else None, params)


def degrade(clip: np.ndarray, config: DegradationConfig, rng_or_seed: RngOrSeed, *,
            upsample: bool = True) -> DegradedClip:
    """A (low-res, upsampled-back) pair for one uint8 (T, H, W, 3) clip; same seed, same bytes.

    ``upsample=False`` skips the last step (the costliest; ``bicubic_upsample`` can run later, or on
    the device with its own resize, if moving the 1/scale^2-sized low-res clip is cheaper).
    """
    _check_clip(clip, config.scales)  # every scale the config may draw, so a bad size fails on the first clip
    return apply_degradation(clip, sample_params(config, rng_or_seed), upsample=upsample)


def degrade_float(video: np.ndarray, config: DegradationConfig, rng_or_seed: RngOrSeed, *,
                  upsample: bool = True) -> DegradedClip:
    """``degrade`` for float (T, H, W, 3) in [-1, 1]: rounded to 8 bits (outside values clipped), out as float32."""
    video = np.asarray(video)
    if not np.issubdtype(video.dtype, np.floating):
        raise TypeError(f"degrade_float takes float frames in [-1, 1], got {video.dtype}; uint8 goes to degrade.")
    if not np.isfinite(video).all():
        raise ValueError("video holds NaN or infinite values.")
    pixels = np.clip(np.rint((video.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out = degrade(pixels, config, rng_or_seed, upsample=upsample)

    def to_float(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)

    return DegradedClip(to_float(out.lowres), to_float(out.upsampled), out.params)
