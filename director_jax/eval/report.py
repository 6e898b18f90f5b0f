"""Writing an evaluation's results: ``metrics.json`` (numbers only) and ``report.html`` (tables, plots, sheets).

``metrics.json`` holds nothing that varies between runs of one config and checkpoint (no times,
no paths of the output), so two runs can be compared byte for byte; NaN becomes ``null``. Both
files are written atomically (``io_utils``), the contact sheets by ``video_io.contact_sheet`` (requested
and detected cuts marked) and the fidelity-against-distance plots by ``eval/plots.py`` under ``media/``.
The page reads every key with ``.get``: a ``metrics.json`` of an older run (no cut, pacing, flicker
or distance metrics) gives the same page with those parts left out.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.eval import report_html as rh
from director_jax.eval.plots import distance_curves
from director_jax.eval.suite import EvalCase
from director_jax.io_utils import atomic_write_text
from director_jax.video_io import contact_sheet


def _clean(value: Any) -> Any:
    """JSON-safe: NaN / inf -> None, NumPy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(workdir: Path, results: dict) -> Path:
    return atomic_write_text(workdir / "metrics.json", json.dumps(_clean(results), indent=1, sort_keys=True) + "\n")


def detected_cuts(results: Mapping[str, Any], detected: Mapping[int, Sequence[int]] | None = None
                  ) -> dict[int, list[int]]:
    """Cuts found per case index: ``detected`` where given, else each case row's ``detected_cuts`` (if any)."""
    found = {int(r["index"]): list(r["detected_cuts"]) for r in results.get("cases", ())
             if "index" in r and r.get("detected_cuts") is not None}
    found.update({int(i): [int(c) for c in cuts] for i, cuts in (detected or {}).items()})
    return found


def distance_plots(media: Path, results: Mapping[str, Any], prefix: str = "distance") -> list[tuple[str, Path]]:
    """The fidelity-against-distance PNGs of one run: all cases, then one line per template (if recorded)."""
    out = []
    overall = results.get("by_distance")
    if overall:
        path = distance_curves(media / f"{prefix}.png", {"all cases": overall}, title="all cases")
        if path is not None:
            out.append(("all cases", path))
    templates = results.get("by_distance_template") or {}
    if templates:
        path = distance_curves(media / f"{prefix}_templates.png", dict(templates), title="by template")
        if path is not None:
            out.append(("by template", path))
    return out


def distance_table(curve: Mapping[str, Any]) -> str:
    """The numbers behind a distance curve, with how many frames each distance averages."""
    distances = list(curve.get("distance") or ())
    keys = [k for k in ("frames", "psnr", "ssim", "lpips") if k in curve] + sorted(
        k for k in curve if k not in ("distance", "frames", "psnr", "ssim", "lpips") and isinstance(curve[k], list))

    def cell(k: str, i: int) -> str:
        values = curve.get(k) or ()
        return rh.fmt(values[i]) if i < len(values) else "—"

    return rh.table(["frames from keyframe", *keys], ([str(d), *(cell(k, i) for k in keys)]
                                                     for i, d in enumerate(distances)))


def _summary(agg: Mapping[str, Any]) -> str:
    rows = [[html.escape(rh.label(k)), rh.fmt_metric(k, agg), rh.direction(k) or "—"] for k in rh.metric_keys(agg)]
    return rh.table(["metric", "value", "better"], rows)


def _columns(results: Mapping[str, Any]) -> list[str]:
    """Per-case / per-template columns: the metrics the table of labels knows or the aggregate holds."""
    agg = results.get("aggregate") or {}
    return [k for k in rh.metric_keys(results.get("cases") or [], *(results.get("by_template") or {}).values())
            if (k in rh.LABELS or k in agg) and k not in ("fvd", "fvd_clips")]


def _case_rows(results: Mapping[str, Any], found: Mapping[int, list[int]], columns: Sequence[str]) -> list[list[str]]:
    rows = []
    for r in results.get("cases") or ():
        index = r.get("index")
        rows.append([str(index), html.escape(rh.case_name(r)), rh.fmt_frames(r.get("keyframes")),
                     rh.fmt_frames(r.get("cuts")), rh.fmt_frames(found.get(index) if index in found else None),
                     *(rh.fmt(r.get(k)) for k in columns)])
    return rows


_ABOUT = """<p>Fidelity metrics compare the generated (non-keyframe) frames with the true held-out clip; keyframe
metrics compare the keyframe frames with the keyframes given; the temporal error is the mean L1 between the clip's
and the true clip's frame-to-frame changes (no optical flow; pairs across cuts left out); the trajectory error is
the distance between the centroid of each object's colour and its true centre, on generated frames. Cut metrics
compare the cuts found in the generated video with the cuts asked for (precision: found cuts that were asked for;
recall: asked cuts that were found; offsets in frames). FVD uses Kinetics-400 I3D {layer} of the first {frames}
frames resized to {size} px (16 frames at 224 px is the standard), with its interval where recorded; with few clips
it is only comparable between runs of this suite. All numbers are also in metrics.json.</p>"""


def write_report(workdir: Path, results: dict, cases: Sequence[EvalCase], videos: dict[int, np.ndarray], *,
                 title: str, label: str, run_info: dict, media_cases: int,
                 detected: Mapping[int, Sequence[int]] | None = None) -> Path:
    """``report.html`` beside ``metrics.json``: summary, distance plots, tables and contact sheets under ``media/``.

    ``detected`` (case index -> frames where the evaluated video cuts) overrides the case rows'
    ``detected_cuts``; with neither, the sheets and tables show the requested cuts only.
    """
    media = workdir / "media"
    found = detected_cuts(results, detected)
    sheets = []
    for case in cases[:media_cases]:
        video = videos[case.index]
        row = (label, video, found[case.index]) if case.index in found else (label, video)
        path = contact_sheet(media / f"case_{case.index:04d}.png", [("true clip", case.reference), row],
                             marked=case.keyframes, cuts=tuple(getattr(case, "cuts", ())), scale=2)
        sheets.append((case, path.relative_to(workdir).as_posix()))
    plots = [(name, p.relative_to(workdir).as_posix()) for name, p in distance_plots(media, results)]
    agg, settings, run = results.get("aggregate") or {}, results.get("settings") or {}, results.get("run") or {}
    columns = _columns(results)
    head = ["#", "case", "keyframes", "cuts asked", "cuts found", *map(rh.label, columns)]
    by_template = [[html.escape(t), *(rh.fmt(m.get(k)) for k in columns)]
                   for t, m in (results.get("by_template") or {}).items()]
    figures = "\n".join(
        f"<h3>case {c.index}: {html.escape(c.name)}</h3><p>keyframes {rh.fmt_frames(c.keyframes)}; cuts asked "
        f"{rh.fmt_frames(getattr(c, 'cuts', ()))}; cuts found {rh.fmt_frames(found.get(c.index))}; caption: "
        f"{html.escape(c.caption)}</p><img src='{p}' alt='contact sheet of case {c.index}'>" for c, p in sheets)
    curves = "\n".join(f"<h3>{html.escape(n)}</h3><img src='{p}' alt='fidelity against distance, {html.escape(n)}'>"
                       for n, p in plots)
    if results.get("by_distance"):
        curves += "\n<details><summary>numbers (all cases)</summary>" + distance_table(results["by_distance"]) + \
            "</details>"
    about = _ABOUT.format(layer=settings.get("fvd_layer", "logits"), frames=settings.get("fvd_frames", 16),
                          size=settings.get("fvd_size", 224))
    suite = f" on the {html.escape(str(run['suite']))} suite" if run.get("suite") else ""
    body = f"""<h1>Evaluation: {html.escape(title)}</h1>
<p>{len(results.get('cases') or ())} cases{suite}. {html.escape(json.dumps(run_info))}</p>
{rh.warnings_box(results.get('warnings'))}
{about}
<h2>Summary ({len(results.get('cases') or ())} cases)</h2>
{_summary(agg)}
{'<h2>Fidelity against distance from the nearest keyframe</h2>' + curves if curves else ''}
<h2>By template</h2>
{rh.table(['template', *map(rh.label, columns)], by_template)}
<h2>Cases</h2>
{rh.table(head, _case_rows(results, found, columns))}
<h2>Contact sheets</h2>
<p>Top row: the true clip; bottom row: the evaluated video ({html.escape(label)}).</p>
{rh.cut_legend()}
{figures}"""
    return atomic_write_text(workdir / "report.html", rh.page(f"{title}: evaluation", body))
