"""The HTML pieces ``report.html`` and ``compare.html`` share: metric labels and directions, number formats, tables.

One table of labels keeps the two pages (and any later one) naming and reading each metric the same way.
A key not in the table (a metric added later) is still shown, under its own name, with no direction.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# How to read each metric: (label, better direction). "context" numbers describe the clips, no better side.
LABELS: dict[str, tuple[str, str]] = {
    "psnr": ("PSNR generated frames (dB)", "higher"), "ssim": ("SSIM generated frames", "higher"),
    "lpips": ("LPIPS generated frames", "lower"), "keyframe_psnr": ("keyframe PSNR (dB)", "higher"),
    "keyframe_ssim": ("keyframe SSIM", "higher"), "keyframe_lpips": ("keyframe LPIPS", "lower"),
    "temporal_error": ("temporal error (L1 of frame differences)", "lower"),
    "consecutive_psnr": ("consecutive-frame PSNR (dB)", "context"), "motion": ("motion (mean |Δframe|)", "context"),
    "motion_reference": ("true clip's motion", "context"),
    "flicker": ("flicker", "lower"), "flicker_reference": ("true clip's flicker", "context"),
    "trajectory_error_px": ("trajectory error (px)", "lower"),
    "object_missing_fraction": ("objects missing (fraction)", "lower"),
    "cut_precision": ("cut precision (found cuts that were asked for)", "higher"),
    "cut_recall": ("cut recall (asked cuts that were found)", "higher"),
    "cut_f1": ("cut F1", "higher"), "cut_offset_frames": ("cut offset (frames between asked and found)", "lower"),
    "pacing_offset_frames": ("pacing offset (frames)", "lower"),
    "pacing_exact_fraction": ("pacing: cuts on the exact frame (fraction)", "higher"),
    "pacing_margin_db": ("pacing margin (dB)", "higher"),
    "fvd": ("FVD", "lower"), "fvd_clips": ("clips in FVD", "context"),
}
# Shown with another key (FVD's interval), never in a row of their own.
FOLDED = ("fvd_ci_low", "fvd_ci_high")
# Fields of a case row that describe the case; every other number in it is a metric.
CASE_FIELDS = ("index", "name", "clip", "template", "movie_seed", "start", "frames", "fps", "keyframes", "cuts",
               "detected_cuts", "caption", "source")

STYLE = """body{font-family:sans-serif;max-width:1300px;margin:2em auto;background:#fafafa;color:#222}
td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:90%;text-align:left;vertical-align:top}
th{background:#eee} img{max-width:100%} .scroll{overflow-x:auto}
.warn{border:2px solid #d08000;background:#fff4dc;padding:.5em 1em;margin:1em 0}
.better{color:#0a7d20;font-weight:bold} .worse{color:#b0201a}
.swatch{display:inline-block;width:1em;height:1em;vertical-align:middle;margin:0 .3em;border:1px solid #444}"""


def label(key: str) -> str:
    return LABELS.get(key, (key, ""))[0]


def direction(key: str) -> str:
    """"higher", "lower", "context" (no better side) or "" (a metric this table does not know)."""
    return LABELS.get(key, ("", ""))[1]


def number(x: Any) -> float | None:
    """A finite float, else None (None, NaN, strings, lists, bools)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def fmt(x: Any) -> str:
    """A number as the tables show it: 4 decimals below 10, else 2; a missing value as a dash."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if number(x) is None:
        return "—" if x is None or isinstance(x, float) else html.escape(str(x))
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.2f}"


def fmt_frames(frames: Any) -> str:
    """A list of frame indices (cuts, keyframes), or a dash where the row has none recorded."""
    if frames is None:
        return "—"
    return html.escape(", ".join(str(f) for f in frames)) if frames else "none"


def fmt_metric(key: str, values: Mapping[str, Any]) -> str:
    """``values[key]``, with FVD's interval beside it when ``values`` has one."""
    text = fmt(values.get(key))
    if key == "fvd" and (number(values.get("fvd_ci_low")) is not None or number(values.get("fvd_ci_high")) is not None):
        text += f" [{fmt(values.get('fvd_ci_low'))}, {fmt(values.get('fvd_ci_high'))}]"
    return text


def metric_keys(*tables: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> list[str]:
    """The metrics found in the given dicts (or lists of dicts): known ones in table order, then others sorted."""
    found: set[str] = set()
    for t in tables:
        for d in [t] if isinstance(t, Mapping) else t:
            found |= {k for k, v in d.items() if k not in CASE_FIELDS and k not in FOLDED
                      and (v is None or number(v) is not None)}
    return [k for k in LABELS if k in found] + sorted(found - set(LABELS))


def better(key: str, a: Any, b: Any) -> str | None:
    """"a", "b" or "same" by the metric's direction; None where it has none or a value is missing."""
    a, b, way = number(a), number(b), direction(key)
    if a is None or b is None or way not in ("higher", "lower"):
        return None
    if a == b:
        return "same"
    return "b" if (b > a) == (way == "higher") else "a"


def case_name(row: Mapping[str, Any]) -> str:
    """The case's name (synthetic suite) or clip (curated footage)."""
    return str(row.get("name") or row.get("clip") or f"case {row.get('index', '?')}")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; ``header`` is plain text (escaped here), cells are HTML already."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>\n{body}</table></div>"


def warnings_box(lines: Iterable[str] | None, heading: str = "Warnings") -> str:
    """A visible box listing ``lines``; empty where there are none."""
    items = "".join(f"<li>{html.escape(str(w))}</li>" for w in lines or ())
    return f"<div class='warn'><b>{html.escape(heading)}</b><ul>{items}</ul></div>" if items else ""


def cut_legend() -> str:
    """What the marks on a contact sheet mean (colours of ``video_io.contact_sheet``)."""
    def swatch(rgb: str) -> str:
        return f"<span class='swatch' style='background:{rgb}'></span>"

    return (f"<p>{swatch('#ffdc00')}yellow border: a keyframe (the frame given); {swatch('#00ffff')}cyan bar above "
            f"a frame and left of it: a shot asked to start there (a requested cut); {swatch('#ff00ff')}magenta bar "
            "on a frame's left edge: a cut found in that row's video (a detected cut). The frame before each cut is "
            "shown too.</p>")


def page(title: str, body: str) -> str:
    return (f"<!doctype html><meta charset=\"utf-8\"><title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n"
            f"{body}\n")
