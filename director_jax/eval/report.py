"""Writing an evaluation's results: ``metrics.json`` (numbers only) and ``report.html`` (tables + contact sheets).

``metrics.json`` holds nothing that varies between runs of one config and checkpoint (no times,
no paths of the output), so two runs can be compared byte for byte; NaN becomes ``null``. Both
files are written atomically (``io_utils``), the sheets by ``pipeline/video_io.contact_sheet``.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.eval.scoring import PER_CASE
from director_jax.eval.suite import EvalCase
from director_jax.io_utils import atomic_write_text
from director_jax.video_io import contact_sheet

# How to read each metric: (label, better direction).
_LABELS = {
    "psnr": ("PSNR generated frames (dB)", "higher"), "ssim": ("SSIM generated frames", "higher"),
    "lpips": ("LPIPS generated frames", "lower"), "keyframe_psnr": ("keyframe PSNR (dB)", "higher"),
    "keyframe_ssim": ("keyframe SSIM", "higher"), "keyframe_lpips": ("keyframe LPIPS", "lower"),
    "temporal_error": ("temporal error (L1 of frame differences)", "lower"),
    "consecutive_psnr": ("consecutive-frame PSNR (dB)", "context"), "motion": ("motion (mean |Δframe|)", "context"),
    "motion_reference": ("true clip's motion", "context"), "trajectory_error_px": ("trajectory error (px)", "lower"),
    "object_missing_fraction": ("objects missing (fraction)", "lower"), "fvd": ("FVD", "lower"),
    "fvd_clips": ("clips in FVD", "context"),
}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, NumPy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(workdir: Path, results: dict) -> Path:
    return atomic_write_text(workdir / "metrics.json", json.dumps(_clean(results), indent=1, sort_keys=True) + "\n")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def write_report(workdir: Path, results: dict, cases: Sequence[EvalCase], videos: dict[int, np.ndarray], *,
                 title: str, label: str, run_info: dict, media_cases: int) -> Path:
    """``report.html`` beside ``metrics.json``: summary, per-template and per-case tables, contact sheets."""
    media = workdir / "media"
    sheets = []
    for case in cases[:media_cases]:
        path = contact_sheet(media / f"case_{case.index:04d}.png",
                             [("true clip", case.reference), (label, videos[case.index])],
                             marked=case.keyframes, scale=2)
        sheets.append((case, path.relative_to(workdir).as_posix()))
    agg, settings = results["aggregate"], results.get("settings", {})
    summary = "\n".join(f"<tr><td>{html.escape(_LABELS[k][0])}</td><td>{_fmt(agg.get(k))}</td>"
                        f"<td>{_LABELS[k][1]}</td></tr>" for k in (*PER_CASE, "fvd", "fvd_clips") if k in agg)
    head = "".join(f"<th>{html.escape(_LABELS[k][0])}</th>" for k in PER_CASE)
    by_template = "\n".join(f"<tr><td>{html.escape(t)}</td>" + "".join(f"<td>{_fmt(m[k])}</td>" for k in PER_CASE)
                            + "</tr>" for t, m in results["by_template"].items())
    per_case = "\n".join(f"<tr><td>{r['index']}</td><td>{html.escape(r['name'])}</td><td>{r['keyframes']}</td>"
                         + "".join(f"<td>{_fmt(r[k])}</td>" for k in PER_CASE) + "</tr>" for r in results["cases"])
    figures = "\n".join(f"<h3>case {c.index}: {html.escape(c.name)}</h3><p>keyframes {list(c.keyframes)}, cuts "
                        f"{list(c.cuts)}; caption: {html.escape(c.caption)}</p><img src='{p}'>" for c, p in sheets)
    page = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(title)}: evaluation</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;background:#fafafa}}
td,th{{padding:3px 8px;border-bottom:1px solid #ddd;font-size:90%}} img{{max-width:100%}}</style>
<h1>Evaluation: {html.escape(title)}</h1>
<p>{html.escape(json.dumps(run_info))}</p>
<p>Fidelity metrics compare the generated (non-keyframe) frames with the true held-out clip; keyframe metrics
compare the keyframe frames with the keyframes given; the temporal error is the mean L1 between the clip's and
the true clip's frame-to-frame changes (no optical flow; pairs across cuts left out); the trajectory error is
the distance between the centroid of each object's colour and its true centre, on generated frames. FVD uses
Kinetics-400 I3D {settings.get('fvd_layer', 'logits')} of the first {settings.get('fvd_frames', 16)} frames
resized to {settings.get('fvd_size', 224)} px (16 frames at 224 px is the standard); with few clips it is only
comparable between runs of this suite. All numbers are also in metrics.json.</p>
<h2>Summary ({len(results['cases'])} cases)</h2>
<table><tr><th>metric</th><th>value</th><th>better</th></tr>
{summary}</table>
<h2>By template</h2>
<table><tr><th>template</th>{head}</tr>
{by_template}</table>
<h2>Cases</h2>
<table><tr><th>#</th><th>case</th><th>keyframes</th>{head}</tr>
{per_case}</table>
<h2>Contact sheets</h2>
<p>Top row: the true clip; bottom row: the evaluated video. Yellow frames are the keyframes.</p>
{figures}
"""
    return atomic_write_text(workdir / "report.html", page)
