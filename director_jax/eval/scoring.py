"""Every metric of one evaluation run: per case, per template, over the whole suite, and against keyframe distance.

Per case (videos (T, H, W, 3) in [-1, 1] against the case's true clip):

* fidelity on the **generated** frames (the keyframes excluded): ``psnr`` (mean of per-frame PSNR,
  capped at 100 dB), ``ssim`` (dm-pix, Gaussian window), ``lpips`` (AlexNet);
* **keyframe adherence** on the keyframe frames, against the keyframes given: ``keyframe_psnr``,
  ``keyframe_ssim``, ``keyframe_lpips`` (a given frame goes through the VAE, so this is not exact);
* **pacing** (``eval/pacing.py``): for each keyframe, the frame of the video closest to it against
  its requested frame: ``pacing_offset_frames``, ``pacing_exact_fraction``, ``pacing_margin_db``;
* **cuts** (``eval/cuts.py``): PySceneDetect on the video against the requested cuts (the true
  clip's): ``detected_cuts``, ``cut_precision``, ``cut_recall``, ``cut_offset_frames``;
* **temporal consistency** (``eval/temporal.py``): ``temporal_error``, ``consecutive_psnr``, ``motion``,
  ``flicker`` and the true clip's ``motion_reference`` and ``flicker_reference``;
* **object trajectory** on the generated frames (``eval/trajectory.py``, synthetic cases only):
  ``trajectory_error_px``, ``object_missing_fraction``.

Over the suite: the mean of each per-case metric (``aggregate`` and ``by_template``), cut precision
and recall pooled over the cuts of all cases (not a mean of per-case ratios), the fidelity curves
over the distance to the nearest keyframe (``by_distance``, ``by_distance_template``;
``eval/curves.py``), and **FVD** between the I3D features (``eval/i3d.py``) of all generated clips and
of all true clips, with a bootstrap interval (the cases resampled, each generated clip with its true
one: the spread over which cases the suite drew) and the number of clips it rests on; below
``fvd_min_clips`` a warning says the number is only comparable between runs of this suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from director_jax.eval.curves import distance_curve, keyframe_distance
from director_jax.eval.cuts import case_cut_fields, cut_accuracy, detect_cuts
from director_jax.eval.frechet import FVD_MIN_CLIPS, bootstrap_interval, feature_frechet_distance
from director_jax.eval.metrics import psnr
from director_jax.eval.pacing import keyframe_landing
from director_jax.eval.ssim import ssim
from director_jax.eval.suite import EvalCase
from director_jax.eval.temporal import MAX_PSNR, consecutive_psnr, flicker, motion, temporal_error
from director_jax.eval.trajectory import trajectory_error
from director_jax.models.i3d import shared_i3d
from director_jax.models.lpips import default_lpips

# Per-case metrics averaged over cases (a case without one, e.g. trajectories on real footage, is left out).
PER_CASE = ("psnr", "ssim", "lpips", "keyframe_psnr", "keyframe_ssim", "keyframe_lpips", "pacing_offset_frames",
            "pacing_exact_fraction", "pacing_margin_db", "temporal_error", "consecutive_psnr", "motion",
            "motion_reference", "flicker", "flicker_reference", "trajectory_error_px", "object_missing_fraction")
POOLED_CUTS = ("cut_precision", "cut_recall", "cut_f1", "cut_offset_frames", "cut_requested", "cut_detected",
               "cut_matched")


@dataclasses.dataclass(frozen=True)
class MetricSettings:
    lpips_net: str = "alexnet"
    fvd: bool = True
    fvd_frames: int = 16
    fvd_size: int = 224
    fvd_layer: str = "logits"
    fvd_bootstrap: int = 200  # resamples of the FVD's interval (0: none)
    fvd_min_clips: int = FVD_MIN_CLIPS  # fewer clips: a warning
    cut_detector: str = "content"  # PySceneDetect's ContentDetector ("adaptive": AdaptiveDetector)
    cut_threshold: float = 0.0  # 0: the detector's default
    cut_tolerance: int = 2  # frames a detected cut may miss its requested frame by and still count


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def case_metrics(case: EvalCase, video: np.ndarray, settings: MetricSettings) -> tuple[dict, dict[str, np.ndarray]]:
    """All per-case metrics of one generated ``video`` (T, H, W, 3) against ``case``, and its per-frame
    ``distance`` / ``psnr`` / ``ssim`` / ``lpips`` (the distance curves' input)."""
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
        "flicker": flicker(video, case.cuts),
        "flicker_reference": flicker(ref, case.cuts),
    }
    landing = keyframe_landing(video, {int(k): ref[k] for k in keys})
    out.update({k: v for k, v in landing.items() if k.startswith("pacing_")}, landed_keyframes=landing["landed_frames"])
    detected = detect_cuts(video, detector=settings.cut_detector, threshold=settings.cut_threshold or None,
                           fps=case.fps)
    out.update(case_cut_fields(case.cuts, detected, settings.cut_tolerance))
    if case.truth is not None:
        out.update(trajectory_error(video, case.truth, generated))
    frames = {"distance": keyframe_distance(case.num_frames, keys), "psnr": frame_psnr, "ssim": frame_ssim,
              "lpips": frame_lpips}
    return out, frames


def _means(rows: Sequence[dict]) -> dict[str, float]:
    """Mean of each per-case metric over the rows that have a finite value; cut counts pooled."""
    out = {}
    for k in PER_CASE:
        values = [float(r[k]) for r in rows if k in r and np.isfinite(r[k])]
        if any(k in r for r in rows):
            out[k] = float(np.mean(values)) if values else float("nan")
    out.update(cut_accuracy([r["cut_match"] for r in rows]))
    return out


_REFERENCE_FEATURES: dict[str, np.ndarray] = {}  # digest of (settings, true clips) -> their I3D features


def _reference_features(i3d, clips: np.ndarray, settings: MetricSettings) -> np.ndarray:
    """The true clips' I3D features, kept for the process: a model and its baselines scored on one suite in one
    process (the demo, a notebook) pay for them once. Keyed by the clips' bytes, so other clips never hit."""
    h = hashlib.sha256(repr((settings.fvd_layer, settings.fvd_frames, settings.fvd_size, clips.shape)).encode())
    h.update(np.ascontiguousarray(clips).tobytes())
    key = h.hexdigest()
    if key not in _REFERENCE_FEATURES:
        if len(_REFERENCE_FEATURES) >= 4:
            _REFERENCE_FEATURES.pop(next(iter(_REFERENCE_FEATURES)))
        _REFERENCE_FEATURES[key] = i3d.features(clips)
    return _REFERENCE_FEATURES[key]


def fvd(videos: Sequence[np.ndarray], references: Sequence[np.ndarray], settings: MetricSettings) -> dict:
    """``fvd`` between generated clips and true clips, its bootstrap interval (``fvd_ci_low`` / ``fvd_ci_high``,
    95%) and ``fvd_clips``; None values with fewer than 2 clips (no covariance)."""
    out: dict = {"fvd": None, "fvd_clips": len(videos)}
    if len(videos) < 2:
        return out
    n = settings.fvd_frames
    clips = [np.asarray(v)[:n] if n else np.asarray(v) for v in [*videos, *references]]
    if len({c.shape for c in clips}) > 1:
        raise ValueError(f"FVD needs clips of one shape; got {sorted({c.shape for c in clips})}. Set "
                         "--config.metrics.fvd_frames to at most the shortest case's length.")
    i3d = shared_i3d(settings.fvd_layer, n, settings.fvd_size)
    generated = i3d.features(np.stack(clips[:len(videos)]))
    true = _reference_features(i3d, np.stack(clips[len(videos):]), settings)
    out["fvd"] = feature_frechet_distance(generated, true)
    if settings.fvd_bootstrap:
        out["fvd_ci_low"], out["fvd_ci_high"] = bootstrap_interval(generated, true, samples=settings.fvd_bootstrap,
                                                                        paired=True)
    return out


def score(cases: Sequence[EvalCase], videos: dict[int, np.ndarray], settings: MetricSettings, *,
          progress: bool = True) -> dict:
    """``{"cases", "aggregate", "by_template", "by_distance", "by_distance_template", "warnings"}`` for the
    generated ``videos`` by case index (the module doc lists the metrics)."""
    rows, frames = [], []
    for case in tqdm(cases, desc="metrics", unit="case", disable=not progress, dynamic_ncols=True):
        metrics, per_frame = case_metrics(case, videos[case.index], settings)
        rows.append({**case.describe(), **metrics})
        frames.append(per_frame)
    aggregate = _means(rows)
    templates = list(dict.fromkeys(c.template for c in cases))
    by_template = {t: _means([r for r in rows if r["template"] == t]) for t in templates}
    by_distance_template = {t: distance_curve([f for f, c in zip(frames, cases, strict=True) if c.template == t])
                            for t in templates}
    warnings = []
    if settings.fvd:
        aggregate.update(fvd([videos[c.index] for c in cases], [c.reference for c in cases], settings))
        if len(cases) < settings.fvd_min_clips:
            warnings.append(f"FVD from {len(cases)} clips (< {settings.fvd_min_clips}): biased by the sample size "
                            "and only comparable between runs of this suite (see its bootstrap interval).")
    return {"cases": rows, "aggregate": aggregate, "by_template": by_template, "by_distance": distance_curve(frames),
            "by_distance_template": by_distance_template, "warnings": warnings}
