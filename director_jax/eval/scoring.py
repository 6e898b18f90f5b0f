"""Every metric of one evaluation run: per case, per template and over the whole suite.

Per case (videos (T, H, W, 3) in [-1, 1] against the case's true clip):

* fidelity on the **generated** frames (the keyframes excluded): ``psnr`` (mean of per-frame PSNR,
  capped at 100 dB), ``ssim`` (dm-pix, Gaussian window), ``lpips`` (AlexNet);
* **keyframe adherence** on the keyframe frames, against the keyframes given: ``keyframe_psnr``,
  ``keyframe_ssim``, ``keyframe_lpips`` (a given frame goes through the VAE, so this is not exact);
* **temporal consistency** (``eval/temporal.py``): ``temporal_error``, ``consecutive_psnr``, ``motion``
  and the true clip's ``motion_reference``;
* **object trajectory** on the generated frames (``eval/trajectory.py``): ``trajectory_error_px``,
  ``object_missing_fraction``.

Over the suite: the mean of each per-case metric (``aggregate`` and ``by_template``), and **FVD**
between the I3D features (``eval/i3d.py``) of all generated clips and of all true clips, with the
number of clips it rests on (FVD from a few dozen clips is noisy: compare runs of one suite only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from director_jax.eval.frechet import feature_frechet_distance
from director_jax.eval.metrics import psnr
from director_jax.eval.ssim import ssim
from director_jax.eval.suite import EvalCase
from director_jax.eval.temporal import MAX_PSNR, consecutive_psnr, motion, temporal_error
from director_jax.eval.trajectory import trajectory_error
from director_jax.models.i3d import shared_i3d
from director_jax.models.lpips import default_lpips

PER_CASE = ("psnr", "ssim", "lpips", "keyframe_psnr", "keyframe_ssim", "keyframe_lpips", "temporal_error",
            "consecutive_psnr", "motion", "motion_reference", "trajectory_error_px", "object_missing_fraction")


@dataclasses.dataclass(frozen=True)
class MetricSettings:
    lpips_net: str = "alexnet"
    fvd: bool = True
    fvd_frames: int = 16
    fvd_size: int = 224
    fvd_layer: str = "logits"


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def case_metrics(case: EvalCase, video: np.ndarray, settings: MetricSettings) -> dict[str, float]:
    """All per-case metrics of one generated ``video`` (T, H, W, 3) against ``case``."""
    ref = case.reference
    video = np.asarray(video, np.float32)
    if video.shape != ref.shape:
        raise ValueError(f"case {case.index} ({case.name}): video {video.shape} but the true clip is {ref.shape}.")
    keys = np.asarray(case.keyframes, int)
    generated = np.setdiff1d(np.arange(case.num_frames), keys)
    frame_psnr = np.minimum(psnr(video, ref, axis=(1, 2, 3)), MAX_PSNR)
    frame_ssim = ssim(video, ref)
    frame_lpips = np.asarray(default_lpips(settings.lpips_net)(video, ref), np.float64)
    out = {
        "psnr": _mean_or_nan(frame_psnr[generated]),
        "ssim": _mean_or_nan(frame_ssim[generated]),
        "lpips": _mean_or_nan(frame_lpips[generated]),
        "keyframe_psnr": _mean_or_nan(frame_psnr[keys]),
        "keyframe_ssim": _mean_or_nan(frame_ssim[keys]),
        "keyframe_lpips": _mean_or_nan(frame_lpips[keys]),
        "temporal_error": temporal_error(video, ref, case.cuts),
        "consecutive_psnr": consecutive_psnr(video, case.cuts),
        "motion": motion(video, case.cuts),
        "motion_reference": motion(ref, case.cuts),
    }
    out.update(trajectory_error(video, case.truth, generated))
    return out


def _means(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows) else float("nan")
            for k in PER_CASE}


def fvd(videos: Sequence[np.ndarray], references: Sequence[np.ndarray], settings: MetricSettings) -> float | None:
    """FVD between generated clips and true clips (None with fewer than 2 clips: no covariance)."""
    if len(videos) < 2:
        return None
    n = settings.fvd_frames
    clips = [np.asarray(v)[:n] if n else np.asarray(v) for v in [*videos, *references]]
    if len({c.shape for c in clips}) > 1:
        raise ValueError(f"FVD needs clips of one shape; got {sorted({c.shape for c in clips})}. Set "
                         "--config.metrics.fvd_frames to at most the shortest case's length.")
    i3d = shared_i3d(settings.fvd_layer, n, settings.fvd_size)
    return feature_frechet_distance(i3d.features(np.stack(clips[:len(videos)])),
                                    i3d.features(np.stack(clips[len(videos):])))


def score(cases: Sequence[EvalCase], videos: dict[int, np.ndarray], settings: MetricSettings, *,
          progress: bool = True) -> dict:
    """``{"cases": [...], "aggregate": {...}, "by_template": {...}}`` for the generated ``videos`` by case index."""
    rows = []
    for case in tqdm(cases, desc="metrics", unit="case", disable=not progress, dynamic_ncols=True):
        rows.append({**case.describe(), **case_metrics(case, videos[case.index], settings)})
    aggregate = _means(rows)
    templates = list(dict.fromkeys(c.template for c in cases))
    by_template = {t: _means([r for r in rows if r["template"] == t]) for t in templates}
    if settings.fvd:
        aggregate["fvd"] = fvd([videos[c.index] for c in cases], [c.reference for c in cases], settings)
        aggregate["fvd_clips"] = len(cases)
    return {"cases": rows, "aggregate": aggregate, "by_template": by_template}
