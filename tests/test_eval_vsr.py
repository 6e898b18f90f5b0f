"""The vsr suite: BasicSR-style metrics, benchmark layouts, bad inputs, and runs (bicubic and a tiny Director-SR).

The model run uses tests/test_sr_train.py's test-size SR config (9 frames of 32x32, 2x from 16x16, a narrow
VAE) with its random train state saved by the trainer's own code; the numbers are those of an untrained model,
so the test checks that they exist, are finite and are reproducible, not that they are good.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from director_jax.configs_common import load_config
from director_jax.data.degradations import bicubic_upsample
from director_jax.errors import UserError
from director_jax.eval.vsr import MAX_PSNR, mean_frames, psnr_rgb, psnr_y, ssim_y
from director_jax.eval.vsr_data import anchor_frames, load_window, natural_key, plan_windows, scan_benchmark
from director_jax.eval.vsr_run import check_vsr_evaluation, run_vsr_evaluation
from director_jax.train.trainer import train
from tests.test_generate import save_gen_checkpoint, save_train_state
from tests.test_sr_train import tiny_sr_config

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIG = ROOT / "configs" / "eval_vsr.py"


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth moving colour gradients plus a little noise: (n, h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for t in range(n):
        img = np.stack([128 + 100 * np.sin((x + 2 * t) / 5), 128 + 100 * np.cos((y - t) / 7),
                        128 + 60 * np.sin((x + y + 3 * t) / 9)], -1)
        out.append(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def _save(folder: Path, frames: np.ndarray, names=None, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"frame{i}" for i in range(len(frames))]
    paths = []
    for name, f in zip(names, frames, strict=True):
        paths.append(folder / f"{name}.{ext}")
        Image.fromarray(f).save(paths[-1])
    return paths


def _pil_down(frames: np.ndarray, scale: int) -> np.ndarray:
    h, w = frames.shape[1] // scale * scale, frames.shape[2] // scale * scale
    return np.stack([np.asarray(Image.fromarray(f[:h, :w]).resize((w // scale, h // scale), Image.BICUBIC))
                     for f in frames])


# ------------------------------------------------------------------------------------------------
# Metrics


def _basicsr_y(img: np.ndarray) -> np.ndarray:
    """BasicSR's to_y_channel on an RGB uint8 image, written out as it is (float32, BGR weights on BGR order)."""
    bgr = img[..., ::-1].astype(np.float32) / 255.0
    y = np.dot(bgr, np.array([24.966, 128.553, 65.481], np.float32)) + 16.0
    return (y / 255.0 * 255.0).astype(np.float64)


def _basicsr_psnr_y(a: np.ndarray, b: np.ndarray, crop: int) -> float:
    a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    mse = np.mean((_basicsr_y(a) - _basicsr_y(b)) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)


def _basicsr_ssim_y(a: np.ndarray, b: np.ndarray, crop: int) -> float:
    """BasicSR's _ssim with cv2.filter2D (a 2-D window, borders cut after filtering)."""
    x, y = _basicsr_y(a[crop:-crop, crop:-crop]), _basicsr_y(b[crop:-crop, crop:-crop])
    k = cv2.getGaussianKernel(11, 1.5)
    win = np.outer(k, k.transpose())
    f = lambda z: cv2.filter2D(z, -1, win)[5:-5, 5:-5]  # noqa: E731
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = f(x), f(y)
    s1, s2, s12 = f(x * x) - mu1 ** 2, f(y * y) - mu2 ** 2, f(x * y) - mu1 * mu2
    return float((((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))).mean())


def test_psnr_known_answers():
    img = _frames(1, 24, 20)[0]
    assert psnr_y(img, img) == np.inf and psnr_rgb(img, img, 2) == np.inf
    assert mean_frames({"psnr_y": np.array([np.inf, 30.0]), "psnr_rgb": np.array([np.inf, 30.0]),
                        "ssim_y": np.ones(2), "lpips": np.zeros(2)})["psnr_y"] == (MAX_PSNR + 30.0) / 2
    # a constant offset of 10 on every RGB channel: Y moves by 10 * (65.481 + 128.553 + 24.966) / 255 = 8.588...
    flat = np.full((16, 16, 3), 100, np.uint8)
    dy = 10 * (65.481 + 128.553 + 24.966) / 255
    assert psnr_y(flat + 10, flat) == pytest.approx(10 * np.log10(255 ** 2 / dy ** 2), abs=1e-9)
    assert psnr_rgb(flat + 10, flat) == pytest.approx(10 * np.log10(255 ** 2 / 100), abs=1e-9)
    # a corrupted border of scale pixels is not scored
    bad = img.copy()
    bad[:4], bad[-4:], bad[:, :4], bad[:, -4:] = 0, 255, 7, 200
    assert psnr_y(bad, img, crop_border=4) == np.inf and np.isfinite(psnr_y(bad, img, crop_border=3))
    assert ssim_y(bad, img, crop_border=4) == pytest.approx(1.0)


def test_psnr_and_ssim_match_basicsr_formulas():
    a, b = _frames(2, 40, 36, seed=1)
    for crop in (2, 4):
        assert psnr_y(a, b, crop) == pytest.approx(_basicsr_psnr_y(a, b, crop), abs=1e-4)
        assert ssim_y(a, b, crop) == pytest.approx(_basicsr_ssim_y(a, b, crop), abs=1e-6)
    both = psnr_y(np.stack([a, b]), np.stack([b, a]), 2)  # batched over frames
    assert both.shape == (2,) and both[0] == pytest.approx(_basicsr_psnr_y(a, b, 2), abs=1e-4)


# ------------------------------------------------------------------------------------------------
# Folder layouts


def test_layouts_and_the_bi_degradation(tmp_path):
    hr = _frames(6, 36, 40)
    lr = _pil_down(hr, 2)
    names = [f"im{i}" for i in (1, 2, 3, 10, 11, 20)]  # natural order: 10 after 3
    # (a): GT + LR (LR as .jpg names with the same stems is fine; here png)
    _save(tmp_path / "a" / "GT" / "seqB", hr, names)
    _save(tmp_path / "a" / "LR" / "seqB", lr, names)
    _save(tmp_path / "a" / "GT" / "seq10", hr[:5])
    _save(tmp_path / "a" / "LR" / "seq10", lr[:5])
    bench = scan_benchmark(tmp_path / "a", scale=None)
    assert bench.layout == "a" and bench.scale == 2 and bench.lr_dir == "LR"
    assert [s.name for s in bench.sequences] == ["seq10", "seqB"]
    assert [p.stem for p in bench.sequences[1].hr] == names
    # (b): SPMCS, and (c): HR only -> LR by the BI degradation (PIL bicubic)
    _save(tmp_path / "b" / "car" / "truth", hr)
    _save(tmp_path / "b" / "car" / "input4", lr)
    _save(tmp_path / "c" / "walk", hr)
    for layout, sub in (("b", "b"), ("c", "c")):
        bench = scan_benchmark(tmp_path / sub, scale=2)
        assert bench.layout == layout
        windows, skipped = plan_windows(bench, frames=4, min_frames=2, lr_multiple=8, anchors=("#0", "last"))
        assert [(w.start, w.length, w.anchors) for w in windows] == [(0, 4, (0, 3)), (4, 2, (0, 1))] and not skipped
        got_hr, got_lr = load_window(windows[0])
        # LR 18x20 center-cropped to 16x16 at (1, 2), HR at twice that
        np.testing.assert_array_equal(got_lr, lr[:4, 1:17, 2:18])
        np.testing.assert_array_equal(got_hr, hr[:4, 2:34, 4:36])
    assert natural_key("f2") < natural_key("f10")
    assert anchor_frames(("every:4", "last"), 9) == (0, 4, 8) and anchor_frames(("#12",), 9) == ()


def test_windows_skip_short_parts_with_a_reason(tmp_path):
    _save(tmp_path / "GT" / "long", _frames(11, 32, 32))
    _save(tmp_path / "GT" / "short", _frames(3, 32, 32))
    bench = scan_benchmark(tmp_path, scale=2)
    windows, skipped = plan_windows(bench, frames=4, min_frames=4, lr_multiple=8)
    assert [(w.sequence.name, w.start) for w in windows] == [("long", 0), ("long", 4)]
    assert [(s["sequence"], s["start"], s["frames"]) for s in skipped] == [("long", 8, 3), ("short", 0, 3)]
    assert "remainder of 3 frames" in skipped[0]["reason"] and "sequence of 3 frames" in skipped[1]["reason"]
    windows, _ = plan_windows(bench, frames=4, min_frames=2, lr_multiple=8, max_frames=5, max_sequences=1)
    assert [(w.start, w.length) for w in windows] == [(0, 4)]  # 5 frames: the last one alone is below 2


def _cfg(data: Path, **over):
    cfg = load_config(EVAL_CONFIG)
    cfg.data = str(data)
    cfg.metrics.lpips_net = ""
    for k, v in over.items():
        cfg[k] = v
    return cfg


@pytest.mark.parametrize("case, message", [
    ("empty", "holds no sequences"),
    ("missing", "does not exist"),
    ("mixed", "sequence 'calendar' has HR frames of mixed sizes: frame0.png is 32x32 but frame1.png is 40x32"),
    ("lr_size", "sequence 'calendar': LR frames are 15x16 but the 32x32 HR frames at scale 2 need 16x16"),
    ("unreadable", "cannot read image"),
    ("two_lr", "several LR folders"),
])
def test_bad_benchmarks_are_one_line_user_errors(tmp_path, case, message):
    data = tmp_path / "data"
    data.mkdir()
    frames = _frames(2, 32, 32)
    if case == "mixed":
        _save(data / "GT" / "calendar", frames[:1])
        _save(data / "GT" / "calendar", _frames(1, 32, 40), ["frame1"])
    elif case in ("lr_size", "two_lr"):
        _save(data / "GT" / "calendar", frames)
        _save(data / "LR" / "calendar", frames[:, :16, :15] if case == "lr_size" else _pil_down(frames, 2))
        if case == "two_lr":
            _save(data / "BDx4" / "calendar", _pil_down(frames, 2))
    elif case == "unreadable":
        _save(data / "GT" / "calendar", frames)
        (data / "GT" / "calendar" / "frame9.png").write_bytes(b"not a png")
    cfg = _cfg(tmp_path / "nowhere" if case == "missing" else data, scale=2)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as e:
        check_vsr_evaluation(cfg, str(tmp_path / "out"), ckpt=None, baseline="bicubic", step=None)
    assert "\n" not in str(e.value)


def test_bad_settings_are_refused_before_work(tmp_path):
    _save(tmp_path / "GT" / "s", _frames(6, 32, 32))
    for over, message in ((dict(anchors=("middle",)), "anchor 'middle'"), (dict(frames=-1), "frames=-1"),
                          (dict(scale=0), "scale is unknown"), (dict(scale=2, min_frames=7), "nothing to evaluate"),
                          (dict(scale=2, suite="synthetic"), "vsr suite")):
        with pytest.raises(UserError, match=message):
            check_vsr_evaluation(_cfg(tmp_path, **over), str(tmp_path / "out"), ckpt=None, baseline="bicubic",
                                 step=None)
    with pytest.raises(UserError, match="--baseline"):
        check_vsr_evaluation(_cfg(tmp_path, scale=2), str(tmp_path / "o"), ckpt=None, baseline=None, step=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--workdir"):
        check_vsr_evaluation(_cfg(tmp_path, scale=2), str(tmp_path / "file"), ckpt=None, baseline="bicubic", step=None)


# ------------------------------------------------------------------------------------------------
# Runs


def test_bicubic_baseline_run_matches_a_direct_computation(tmp_path):
    hr = _frames(5, 36, 36)
    _save(tmp_path / "data" / "c1" / "truth", hr)  # SPMCS layout, LR by BI
    cfg = _cfg(tmp_path / "data", scale=2, frames=0, anchors=())
    check_vsr_evaluation(cfg, str(tmp_path / "out"), ckpt=None, baseline="bicubic", step=None)
    results = run_vsr_evaluation(cfg, tmp_path / "out", baseline="bicubic", progress=False)
    up = bicubic_upsample(_pil_down(hr, 2), 2)  # 36x36: no crop needed at lr_multiple 1
    direct = float(np.mean(psnr_y(up, hr, 2)))
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["suite"] == "vsr" and list(saved["aggregate"]) == ["bicubic"]
    assert saved["aggregate"]["bicubic"]["psnr_y"] == pytest.approx(direct, abs=1e-9)
    assert saved["aggregate"]["bicubic"]["lpips"] is None  # LPIPS off: NaN -> null
    assert results["sequences"][0]["frames"] == 5 and (tmp_path / "out" / "report.html").exists()


def _sr_run(workdir: Path, steps: int = 0):
    """The test-size SR config's train state (random, or trained ``steps`` steps) saved by the trainer."""
    cfg = tiny_sr_config(steps=max(steps, 1))
    if steps:
        train(cfg, str(workdir), devices=jax.devices()[:1], progress=False)
        return cfg
    save_train_state(cfg, workdir, "sr")
    return cfg


def _model_data(root: Path) -> Path:
    _save(root / "GT" / "a", _frames(12, 34, 36, seed=2))  # windows 0..8 and a 3-frame remainder (skipped)
    _save(root / "GT" / "b", _frames(9, 32, 32, seed=3))
    return root


def _check_model_results(results: dict, out: Path) -> None:
    agg = results["aggregate"]
    assert list(agg) == ["bicubic", "model", "model_anchored"]
    for method in agg:
        assert all(np.isfinite(agg[method][k]) for k in ("psnr_y", "psnr_rgb", "ssim_y"))
    assert agg["model"]["frames"] == 18 and agg["model_anchored"]["frames"] == 14  # 2 windows x (9 - 2 anchors)
    assert results["aggregate_non_anchor"]["model"]["frames"] == 14
    assert [(s["sequence"], s["start"], s["frames"]) for s in results["skipped"]] == [("a", 9, 3)]
    assert results["sequences"][0]["crop_hr"] == [0, 2, 32, 32]  # 34x36 -> LR 17x18 -> 16x16 at (0, 1)
    assert (out / "media" / "window_0000.png").exists()


def test_director_sr_run_is_finite_and_reproducible(tmp_path):
    ckpt = tmp_path / "sr"
    _sr_run(ckpt)
    data = _model_data(tmp_path / "data")
    cfg = _cfg(data)
    cfg.sampler.steps = 1
    cfg.report.media_cases = 1
    check_vsr_evaluation(cfg, str(tmp_path / "out1"), ckpt=str(ckpt), baseline=None, step=None)
    results = run_vsr_evaluation(cfg, tmp_path / "out1", ckpt=ckpt, progress=False)
    _check_model_results(results, tmp_path / "out1")
    assert results["run"]["evaluated"]["steps"] == 1
    run_vsr_evaluation(cfg, tmp_path / "out2", ckpt=ckpt, progress=False)
    assert (tmp_path / "out1" / "metrics.json").read_bytes() == (tmp_path / "out2" / "metrics.json").read_bytes()
    # a bicubic-only run of the same data and windows gives the same bicubic numbers
    cfg.model_config = str(ckpt)
    base = run_vsr_evaluation(cfg, tmp_path / "out3", baseline="bicubic", progress=False)
    assert json.dumps(base["aggregate"]["bicubic"]) == json.dumps(results["aggregate"]["bicubic"])  # NaN LPIPS
    # a Director-Gen run or a non-run is refused before loading
    with pytest.raises(UserError, match="not a trainer run"):
        check_vsr_evaluation(_cfg(data), str(tmp_path / "o"), ckpt=str(data), baseline=None, step=None)
    for over, message in ((dict(tile=3), "multiple of the DiT patch 2"), (dict(anchors=("#9",)), "outside windows")):
        with pytest.raises(UserError, match=message):
            check_vsr_evaluation(_cfg(data, **over), str(tmp_path / "o"), ckpt=str(ckpt), baseline=None, step=None)
    gen = save_gen_checkpoint(tmp_path / "gen")
    with pytest.raises(UserError, match="is a 'gen' model, not Director-SR"):
        check_vsr_evaluation(_cfg(data), str(tmp_path / "o"), ckpt=str(gen), baseline=None, step=None)


@pytest.mark.slow
def test_trained_director_sr_with_lpips(tmp_path):
    """A few real training steps, the sr_tiny sampler (4 steps) and LPIPS on."""
    ckpt = tmp_path / "sr"
    _sr_run(ckpt, steps=4)
    data = _model_data(tmp_path / "data")
    cfg = _cfg(data)
    cfg.metrics.lpips_net = "alexnet"
    cfg.tile = 2  # 4x4 latents: four 2x2 tiles (one patch each, no overlap)
    check_vsr_evaluation(cfg, str(tmp_path / "out"), ckpt=str(ckpt), baseline=None, step=None)
    results = run_vsr_evaluation(cfg, tmp_path / "out", ckpt=ckpt, progress=False)
    _check_model_results(results, tmp_path / "out")
    assert all(np.isfinite(results["aggregate"][m]["lpips"]) for m in results["aggregate"])
    assert results["run"]["evaluated"]["tile"] == 2 and results["run"]["evaluated"]["steps"] == 4
