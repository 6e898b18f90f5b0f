"""Director-SR degradations: each step against an independent reference (Pillow called directly, a NumPy bicubic
and Gaussian written from their definitions, noise statistics, PSNR orderings), seeding and errors."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from director_jax.data.degradations import (
    DegradationConfig,
    DegradationParams,
    apply_degradation,
    bicubic_upsample,
    degrade,
    degrade_float,
    sample_params,
)
from director_jax.data.synthetic import make_movie

T, H, W = 9, 64, 64
EVERYTHING = DegradationConfig(scales=(2,), blur_prob=1.0, noise_prob=1.0, jpeg_prob=1.0, codec_prob=1.0)


def _clip(seed: int = 0, t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """A synthetic movie with fine texture on top, so blur, JPEG and H.264 have detail to lose."""
    frames = (make_movie(seed, [t], h, w).frames + 1.0) * 127.5
    texture = np.random.default_rng(seed).normal(0.0, 25.0, (1, h, w, 3))  # static: the codec can track it
    return np.clip(np.rint(frames + texture), 0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _pil_resize(clip: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in clip])


def _keys(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """Keys cubic (a = -0.5) at pixel centres, widened by the factor when shrinking; taps off the edge dropped."""
    s = n_in / n_out
    wide = max(s, 1.0)
    w = _keys(((np.arange(n_in) + 0.5)[None, :] - (np.arange(n_out) + 0.5)[:, None] * s) / wide)
    return w / w.sum(1, keepdims=True)


def _reference_bicubic(clip: np.ndarray, h: int, w: int) -> np.ndarray:
    """Float64 two-pass resize (width first, 8-bit in between, like any uint8 resampler)."""
    x = np.einsum("ow,thwc->thoc", _bicubic_weights(clip.shape[2], w), clip.astype(np.float64))
    x = np.clip(np.rint(x), 0, 255)
    x = np.einsum("oh,thwc->towc", _bicubic_weights(clip.shape[1], h), x)
    return np.clip(np.rint(x), 0, 255)


def _reference_blur(clip: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.pad(clip.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    x = sum(k[i] * x[:, i:i + clip.shape[1]] for i in range(2 * r + 1))
    x = sum(k[i] * x[:, :, i:i + clip.shape[2]] for i in range(2 * r + 1))
    return np.clip(np.rint(x), 0, 255)


@pytest.mark.parametrize("scale", [2, 4])
def test_resize_only_is_pillow_bicubic_down_and_up(scale):
    clip = _clip()
    out = degrade(clip, DegradationConfig.resize_only(scale), 0)
    lowres = _pil_resize(clip, H // scale, W // scale)
    np.testing.assert_array_equal(out.lowres, lowres)
    np.testing.assert_array_equal(out.upsampled, _pil_resize(lowres, H, W))
    assert out.params == DegradationParams(scale=scale, noise_seed=out.params.noise_seed)
    # "Bicubic" is what the definition says: a NumPy Keys-cubic resize agrees to rounding.
    for got, want in ((out.lowres, _reference_bicubic(clip, H // scale, W // scale)),
                      (out.upsampled, _reference_bicubic(lowres, H, W))):
        diff = np.abs(got - want)
        assert diff.max() <= 2 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_bicubic_upsample_is_exactly_the_upsampled_clip():
    out = degrade(_clip(), EVERYTHING, (1, 2))
    np.testing.assert_array_equal(bicubic_upsample(out.lowres, 2), out.upsampled)
    assert out.upsampled.shape == (T, H, W, 3) and out.upsampled.dtype == np.uint8


@pytest.mark.parametrize("sigma", [0.6, 2.0])
def test_blur_is_a_gaussian_filter(sigma):
    clip = _clip(1)
    want = _reference_blur(clip, sigma)
    cfg = DegradationConfig(scales=(1,), blur_prob=1.0, blur_sigma=(sigma, sigma), noise_prob=0.0, jpeg_prob=0.0,
                            codec_prob=0.0)
    out = degrade(clip, cfg, 3)
    assert out.params.blur_sigma == sigma
    diff = np.abs(out.lowres - want)  # float32 vs float64 only flips values sitting on .5
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert _psnr(out.lowres, clip) < 35  # it did blur
    # Blur comes before the downscale.
    down = apply_degradation(clip, DegradationParams(scale=2, blur_sigma=sigma), upsample=False).lowres
    assert np.abs(down - _pil_resize(want.astype(np.uint8), H // 2, W // 2)).max() <= 1


@pytest.mark.parametrize("sigma", [3.0, 12.0])
def test_noise_has_the_requested_std_and_differs_per_frame(sigma):
    grey = np.full((T, H, W, 3), 128, np.uint8)
    out = apply_degradation(grey, DegradationParams(scale=2, noise_sigma=sigma, noise_seed=11))
    noise = out.lowres.astype(np.float64) - 128  # no clipping: 128 +- 127 is over 10 sigma away
    expected = np.sqrt(sigma**2 + 1 / 12)  # rounding to integers adds uniform quantisation noise
    assert abs(noise.std() / expected - 1) < 0.03
    assert abs(noise.mean()) < 0.2
    corr = np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]
    assert abs(corr) < 0.05  # independent from frame to frame
    np.testing.assert_array_equal(
        out.lowres, apply_degradation(grey, DegradationParams(scale=2, noise_sigma=sigma, noise_seed=11)).lowres)


def test_one_parameter_draw_for_all_frames():
    still = np.repeat(_clip(2)[:1], T, axis=0)
    cfg = DegradationConfig(scales=(2,), blur_prob=1.0, noise_prob=0.0, jpeg_prob=1.0, codec_prob=0.0)
    out = degrade(still, cfg, 5)
    assert (out.lowres == out.lowres[:1]).all()  # same blur, kernel and JPEG quality on every frame
    noisy = degrade(still, DegradationConfig(scales=(2,), noise_prob=1.0, codec_prob=0.0), 5)
    assert not (noisy.lowres == noisy.lowres[:1]).all()


def test_jpeg_psnr_falls_with_quality():
    clip = _clip(3)
    clean = _pil_resize(clip, H // 2, W // 2)
    psnr = [_psnr(apply_degradation(clip, DegradationParams(scale=2, jpeg_quality=q), upsample=False).lowres, clean)
            for q in (95, 75, 50, 25, 10)]
    assert all(a > b for a, b in zip(psnr, psnr[1:], strict=False)), psnr
    assert psnr[0] < 60, psnr


def test_codec_round_trip():
    clip = _clip(4)
    clean = _pil_resize(clip, H // 2, W // 2)
    params = DegradationParams(scale=2, codec_crf=30)
    a = apply_degradation(clip, params)
    assert a.lowres.shape == (T, H // 2, W // 2, 3) and a.lowres.dtype == np.uint8
    psnr = [_psnr(apply_degradation(clip, DegradationParams(scale=2, codec_crf=c), upsample=False).lowres, clean)
            for c in (15, 30, 45)]
    assert 15 < psnr[2] < psnr[1] < psnr[0] < 60, psnr  # lossy, and worse with higher CRF
    assert _psnr(a.upsampled, clip) < _psnr(bicubic_upsample(clean, 2), clip)
    # Odd low-res sizes (yuv420p needs even ones) and a single frame.
    odd = apply_degradation(_clip(4, t=1, h=66, w=70), params).lowres
    assert odd.shape == (1, 33, 35, 3)
    # Same bytes after other encodes in between (x264's MB-tree broke this; see _codec).
    np.testing.assert_array_equal(apply_degradation(clip, params).lowres, a.lowres)


def test_seeding():
    clip = _clip(5)
    a, b, c = degrade(clip, EVERYTHING, (3, 7)), degrade(clip, EVERYTHING, (3, 7)), degrade(clip, EVERYTHING, (3, 8))
    assert a.params == b.params and a.params != c.params
    assert a.lowres.tobytes() == b.lowres.tobytes() and a.upsampled.tobytes() == b.upsampled.tobytes()
    assert a.lowres.tobytes() != c.lowres.tobytes()
    g1, g2 = degrade(clip, EVERYTHING, np.random.default_rng(9)), degrade(clip, EVERYTHING, np.random.default_rng(9))
    assert g1.lowres.tobytes() == g2.lowres.tobytes()
    # The params alone reproduce the output, and toggling one step moves no other draw.
    np.testing.assert_array_equal(apply_degradation(clip, a.params).lowres, a.lowres)
    no_jpeg = sample_params(DegradationConfig(scales=(2,), blur_prob=1.0, noise_prob=1.0, jpeg_prob=0.0,
                                              codec_prob=1.0), (3, 7))
    assert no_jpeg.jpeg_quality is None
    assert (no_jpeg.blur_sigma, no_jpeg.noise_seed, no_jpeg.codec_crf) == (a.params.blur_sigma, a.params.noise_seed,
                                                                          a.params.codec_crf)


def test_same_bytes_in_a_fresh_process():
    code = ("import hashlib; from tests.test_degradations import EVERYTHING, _clip; "
            "from director_jax.data.degradations import degrade; o = degrade(_clip(6), EVERYTHING, (1, 1)); "
            "print(hashlib.sha256(o.lowres.tobytes() + o.upsampled.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    here = degrade(_clip(6), EVERYTHING, (1, 1))
    assert out.stdout.strip() == hashlib.sha256(here.lowres.tobytes() + here.upsampled.tobytes()).hexdigest()


def test_sampled_params_follow_the_config():
    cfg = DegradationConfig(scales=(2, 4), down_kernels=("bicubic", "area"), blur_prob=0.5, blur_sigma=(0.5, 1.5),
                            noise_prob=0.0, jpeg_prob=1.0, jpeg_quality=(40, 42), codec_prob=0.25, codec_crf=(20, 21))
    ps = [sample_params(cfg, (0, i)) for i in range(400)]
    assert {p.scale for p in ps} == {2, 4} and {p.down_kernel for p in ps} == {"bicubic", "area"}
    assert {p.jpeg_quality for p in ps} == {40, 41, 42} and all(p.noise_sigma is None for p in ps)
    sigmas = [p.blur_sigma for p in ps if p.blur_sigma is not None]
    assert 0.42 < len(sigmas) / 400 < 0.58 and all(0.5 <= s <= 1.5 for s in sigmas)
    crfs = [p.codec_crf for p in ps if p.codec_crf is not None]
    assert 0.18 < len(crfs) / 400 < 0.32 and set(crfs) == {20, 21}


def test_float_helper_matches_uint8_path():
    clip = _clip(7)
    video = clip.astype(np.float32) / 127.5 - 1.0
    f, u = degrade_float(video, EVERYTHING, 4), degrade(clip, EVERYTHING, 4)
    assert f.lowres.dtype == np.float32 and f.params == u.params
    np.testing.assert_array_equal(f.lowres, u.lowres.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    np.testing.assert_array_equal(f.upsampled, u.upsampled.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    assert degrade_float(video, EVERYTHING, 4, upsample=False).upsampled is None
    with pytest.raises(TypeError, match="float frames"):
        degrade_float(clip, EVERYTHING, 0)


def test_from_config_reads_lists_and_ignores_other_keys():
    cfg = DegradationConfig.from_config({"scales": [4], "jpeg_quality": [20, 30], "clip_frames": 81})
    assert cfg.scales == (4,) and cfg.jpeg_quality == (20, 30)


@pytest.mark.parametrize("kwargs, match", [
    ({"scales": (0,)}, "scales"), ({"scales": (2.5,)}, "scales"), ({"scales": ()}, "scales"),
    ({"down_kernels": ("cubic",)}, "down_kernels"), ({"blur_prob": 1.5}, "probability"),
    ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"), ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
    ({"noise_sigma": (-1.0, 2.0)}, "noise_sigma"), ({"jpeg_quality": (0, 50)}, "jpeg_quality"),
    ({"jpeg_quality": (30.5, 50)}, "jpeg_quality"), ({"codec_crf": (10, 60)}, "codec_crf"),
    ({"codec_crf": 30}, "codec_crf"), ({"codec_preset": "bogus"}, "codec_preset"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DegradationConfig(**kwargs)


def test_bad_input():
    clip = _clip()
    cfg = DegradationConfig.resize_only(2)
    with pytest.raises(ValueError, match=r"64x66, not divisible by scale 4.*crop to a multiple of 4.*:64, :64\]"):
        degrade(np.zeros((2, 64, 66, 3), np.uint8), DegradationConfig.resize_only(4), 0)
    with pytest.raises(ValueError, match="multiple of 6"):  # every scale the config may draw is checked
        degrade(clip, DegradationConfig(scales=(2, 3)), 0)
    with pytest.raises(TypeError, match="degrade_float"):
        degrade(clip.astype(np.float32), cfg, 0)
    with pytest.raises(TypeError, match="numpy array"):
        degrade(clip.tolist(), cfg, 0)
    for shape in [(H, W, 3), (2, T, H, W, 3), (T, H, W, 4), (0, H, W, 3)]:
        with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
            degrade(np.zeros(shape, np.uint8), cfg, 0)
    with pytest.raises(ValueError, match="seed"):
        degrade(clip, cfg, -1)
    with pytest.raises(ValueError, match="scale"):
        bicubic_upsample(clip, 0)
    with pytest.raises(ValueError, match="too wide"):
        apply_degradation(np.zeros((1, 4, 4, 3), np.uint8), DegradationParams(scale=1, blur_sigma=3.0))
    with pytest.raises(ValueError, match="jpeg_quality"):
        DegradationParams(scale=2, jpeg_quality=0)
