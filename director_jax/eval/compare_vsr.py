"""Two runs of the ``vsr`` suite side by side: ``compare.html`` and ``compare.json`` by method and metric.

``compare_runs`` (``eval/compare.py``) hands two vsr ``metrics.json`` here (``eval/vsr_run.py`` writes them:
``aggregate`` / ``aggregate_non_anchor`` = {method: {metric: value}}, ``sequences`` and ``windows`` rows with
per-method ``metrics``). Deltas are B - A; "better" follows each metric's direction (``vsr.BETTER``:
PSNR-Y, PSNR-RGB, SSIM-Y higher, LPIPS lower; frame and sequence counts have none). Runs of
different sequence or window lists are refused (a mean over other frames is another number) unless
``allow_different_cases``: then sequences pair by name, windows by (sequence, start, length,
anchors), and the rest are listed. ``compare.json`` is a pure function of the two ``metrics.json``,
the labels and the paths given (byte-identical between calls); both runs' window contact sheets are
copied into ``OUT/media``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from director_jax.eval import report_html as rh
from director_jax.eval.compare_common import (
    better,
    check_suites,
    copy_sheets,
    delta,
    entry,
    settings_warning,
    workdir_of,
)
from director_jax.eval.report import _clean
from director_jax.eval.vsr import BETTER, METRICS
from director_jax.io_utils import atomic_write_text, dir_path

METHODS = ("bicubic", "model", "model_anchored")  # vsr_run.METHODS (not imported: that module loads the models)
COUNTS = ("frames", "sequences")  # numbers of the tables that describe what was scored, no better side
LABELS = {"psnr_y": "PSNR-Y (dB)", "psnr_rgb": "PSNR-RGB (dB)", "ssim_y": "SSIM-Y", "lpips": "LPIPS",
          "frames": "frames scored", "sequences": "sequences"}
SORT_METRIC = "psnr_y"  # per-sequence rows: largest change of the model's PSNR-Y first


def vsr_entry(key: str, a: Any, b: Any) -> dict:
    """``compare.entry`` with the vsr metric's direction (``vsr.BETTER``; counts: "context")."""
    out = entry(key, a, b)
    way = BETTER.get(key) or ("context" if key in COUNTS else None)
    va, vb = rh.number(a), rh.number(b)
    better = None
    if way in ("higher", "lower") and va is not None and vb is not None:
        better = "same" if va == vb else "b" if (vb > va) == (way == "higher") else "a"
    return {**out, "direction": way, "better": better}


def _keys(*tables: Mapping[str, Any] | None) -> list[str]:
    """The numeric keys of the given metric dicts: ``METRICS`` in order, the counts, then others sorted."""
    found = {k for t in tables for k, v in (t or {}).items() if v is None or rh.number(v) is not None}
    known = [*METRICS, *COUNTS]
    return [k for k in known if k in found] + sorted(found - set(known))


def _methods(*tables: Mapping[str, Any] | None) -> list[str]:
    found = {m for t in tables for m in (t or {})}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def _by_method(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, dict[str, dict]]:
    """{method: {metric: entry}} over the methods and metrics of either run."""
    a, b = a or {}, b or {}
    out = {}
    for m in _methods(a, b):
        ma, mb = a.get(m) or {}, b.get(m) or {}
        out[m] = {k: vsr_entry(k, ma.get(k), mb.get(k)) for k in _keys(ma, mb)}
    return out


def window_key(row: Mapping[str, Any]) -> tuple:
    """What a window covers: its sequence, first frame, length and anchors; equal keys are the same window."""
    return row.get("sequence"), row.get("start"), row.get("frames"), tuple(row.get("anchors") or ())


def describe_window(row: Mapping[str, Any]) -> str:
    seq, start, frames, anchors = window_key(row)
    last = start + frames - 1 if isinstance(start, int) and isinstance(frames, int) else "?"
    return f"{row.get('index')} {seq!r} frames {start}..{last} (anchors {list(anchors)})"


def _first_difference(a: Sequence[Any], b: Sequence[Any], what: str, labels: Sequence[str], show) -> str | None:
    """The first place ``a`` and ``b`` (keys, in order) differ, as a sentence; None where they are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"{what} {i} is {show(x)} in {labels[0]} but {show(y)} in {labels[1]}"
    if len(a) != len(b):
        extra = (a if len(a) > len(b) else b)[min(len(a), len(b))]
        return f"{labels[0]} has {len(a)} {what}s and {labels[1]} {len(b)} (first unpaired: {show(extra)})"
    return None


def pair_vsr(ra: Mapping[str, Any], rb: Mapping[str, Any], labels: Sequence[str], allow_different_cases: bool
             ) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]], dict]:
    """(paired sequence rows, paired window rows, the unpaired ones' descriptions); a ``ValueError`` naming the first
    difference of the sequence or window lists unless ``allow_different_cases``."""
    sa, sb = ra["sequences"], rb["sequences"]
    wa, wb = ra["windows"], rb["windows"]
    if not allow_different_cases:
        def indexed(rows: list[dict]) -> list[tuple]:
            return [(r.get("index"), *window_key(r)) for r in rows]

        def show(k: tuple) -> str:
            return describe_window(dict(zip(("index", "sequence", "start", "frames", "anchors"), k, strict=True)))

        problem = (_first_difference([r.get("name") for r in sa], [r.get("name") for r in sb], "sequence", labels,
                                     repr)
                   or _first_difference(indexed(wa), indexed(wb), "window", labels, show))
        if problem:
            raise ValueError(f"the runs evaluate different frames: {problem}; pass allow_different_cases=True to "
                             "compare the sequences and windows they share.")
    seq_b = {r.get("name"): r for r in sb}
    seqs = [(r, seq_b[r.get("name")]) for r in sa if r.get("name") in seq_b]
    win_b = {window_key(r): r for r in wb}
    wins = [(r, win_b[window_key(r)]) for r in wa if window_key(r) in win_b]
    names, keys = {r.get("name") for r, _ in seqs}, {window_key(r) for r, _ in wins}
    unpaired = {"sequences": {side: [str(r.get("name")) for r in rows if r.get("name") not in names]
                              for side, rows in (("a", sa), ("b", sb))},
                "windows": {side: [describe_window(r) for r in rows if window_key(r) not in keys]
                            for side, rows in (("a", wa), ("b", wb))}}
    return seqs, wins, unpaired


def _warnings(ra: Mapping[str, Any], rb: Mapping[str, Any], labels: Sequence[str], seqs: list, unpaired: dict
              ) -> list[str]:
    out = settings_warning(ra, rb, "the numbers they set (crop, anchors, LPIPS network, windows) may not compare.")
    crops = [r.get("name") for r, q in seqs if r.get("crop_hr") != q.get("crop_hr")]
    if crops:
        out.append(f"{len(crops)} sequences are scored on different crops in the two runs (first: {crops[0]!r}): "
                   "their numbers cover other pixels.")
    us, uw = unpaired["sequences"], unpaired["windows"]
    if us["a"] or us["b"] or uw["a"] or uw["b"]:
        out.append(f"{len(us['a'])} sequences and {len(uw['a'])} windows only in {labels[0]}, {len(us['b'])} and "
                   f"{len(uw['b'])} only in {labels[1]}: aggregates and the shared sequences' means are over "
                   "different frames.")
    return out


def _change(row: Mapping[str, Any], method: str) -> float:
    d = ((row["metrics"].get(method) or {}).get(SORT_METRIC) or {}).get("delta")
    return -1.0 if d is None else abs(d)


def compare_vsr_results(ra: dict, rb: dict, *, labels: Sequence[str], sources: Sequence[str] = ("", ""),
                        allow_different_cases: bool = False) -> dict:
    """The content of ``compare.json`` for two vsr ``metrics.json`` dicts (a ``ValueError`` for runs not comparable)."""
    check_suites(ra, rb, labels)
    seqs, wins, unpaired = pair_vsr(ra, rb, labels, allow_different_cases)
    sequences = [{"name": a.get("name"), "metrics": _by_method(a.get("metrics"), b.get("metrics")),
                  "metrics_non_anchor": _by_method(a.get("metrics_non_anchor"), b.get("metrics_non_anchor"))}
                 for a, b in seqs]
    found = _methods(*(r["metrics"] for r in sequences))
    sort_method = "model" if "model" in found else (found[0] if found else "model")
    sequences.sort(key=lambda r: (-_change(r, sort_method), str(r["name"])))
    windows = [{"index": a.get("index"), "index_b": b.get("index"), "sequence": a.get("sequence"),
                "start": a.get("start"), "frames": a.get("frames"), "anchors": list(a.get("anchors") or ()),
                "metrics": _by_method(a.get("metrics"), b.get("metrics"))} for a, b in wins]
    return {
        "suite": "vsr",
        "labels": list(labels),
        "runs": [{"label": lab, "source": src, "suite": "vsr", "evaluated": (r.get("run") or {}).get("evaluated"),
                  "data": (r.get("run") or {}).get("data"), "sequences": len(r["sequences"]),
                  "windows": len(r["windows"]), "skipped": len(r.get("skipped") or ())}
                 for lab, src, r in zip(labels, sources, (ra, rb), strict=True)],
        "aggregate": _by_method(ra["aggregate"], rb["aggregate"]),
        "aggregate_non_anchor": _by_method(ra.get("aggregate_non_anchor"), rb.get("aggregate_non_anchor")),
        "sequences": sequences,
        "sequence_order": {"method": sort_method, "metric": SORT_METRIC, "by": "largest |B - A| first, then name"},
        "windows": windows,
        "unpaired": unpaired,
        "warnings": _warnings(ra, rb, labels, seqs, unpaired),
    }


def _summary(table: Mapping[str, Mapping[str, dict]], labels: Sequence[str]) -> str:
    la, lb = labels

    def shown_delta(k: str, e: dict) -> str:
        return f"{round(e['delta']):+d}" if k in COUNTS and e["delta"] is not None else delta(e)

    rows = [[html.escape(m), html.escape(LABELS.get(k, k)), rh.fmt(e["a"]), rh.fmt(e["b"]), shown_delta(k, e),
             html.escape(e["direction"] or "—"), better(e, labels)]
            for m, metrics in table.items() for k, e in metrics.items()]
    return rh.table(["method", "metric", la, lb, f"{lb} − {la}", "better when", "better run"], rows)


def _page(cmp: dict, sheets: list[tuple[dict, str | None, str | None]]) -> str:
    la, lb = cmp["labels"]
    diff = f"{lb} − {la}"
    method = cmp["sequence_order"]["method"]
    others = [k for k in ("ssim_y", "lpips") if any(k in (r["metrics"].get(method) or {}) for r in cmp["sequences"])]

    def cell(r: dict, k: str) -> dict:
        return (r["metrics"].get(method) or {}).get(k) or {}

    seq_rows = [[html.escape(str(r["name"])), rh.fmt(cell(r, "frames").get("a")), rh.fmt(cell(r, SORT_METRIC).get("a")),
                 rh.fmt(cell(r, SORT_METRIC).get("b")), delta(cell(r, SORT_METRIC)),
                 *(delta(cell(r, k)) for k in others)] for r in cmp["sequences"]]
    seq_head = ["sequence", f"frames ({la})", f"{la} PSNR-Y", f"{lb} PSNR-Y", diff,
                *(f"{LABELS[k]} {diff}" for k in others)]
    runs = "".join(f"<li><b>{html.escape(r['label'])}</b>: {html.escape(r['source'])} ({r['sequences']} sequences, "
                   f"{r['windows']} windows, {r['skipped']} skipped"
                   + (f"; {html.escape(json.dumps(r['evaluated']))}" if r["evaluated"] else "") + ")</li>"
                   for r in cmp["runs"])
    non_anchor = (f"<h2>Non-anchor frames only (every method)</h2>\n{_summary(cmp['aggregate_non_anchor'], (la, lb))}"
                  if cmp["aggregate_non_anchor"] else "")
    unpaired = "".join(f"<li>only in {html.escape(lab)}: {html.escape(', '.join(items))}</li>"
                       for what in ("sequences", "windows") for side, lab in (("a", la), ("b", lb))
                       if (items := cmp["unpaired"][what][side]))
    figures = "\n".join(f"<h3>window {html.escape(describe_window(w))}</h3>"
                        + "".join(f"<p>{html.escape(lab)}</p><img src='{p}' alt='{html.escape(lab)} contact sheet'>"
                                  for lab, p in ((la, pa), (lb, pb)) if p) for w, pa, pb in sheets)
    body = f"""<h1>VSR comparison: {html.escape(la)} vs {html.escape(lb)}</h1>
<ul>{runs}</ul>
<p>Deltas are {html.escape(diff)}; green: {html.escape(lb)} is better by the metric's direction, red: worse.
model_anchored is scored on its non-anchor frames (as in each run's report).</p>
{rh.warnings_box(cmp['warnings'], 'Comparison')}
<h2>Summary</h2>
{_summary(cmp['aggregate'], (la, lb))}
{non_anchor}
<h2>Sequences, largest {html.escape(method)} PSNR-Y change first</h2>
{rh.table(seq_head, seq_rows)}
{f'<h2>Unpaired</h2><ul>{unpaired}</ul>' if unpaired else ''}
<h2>Contact sheets</h2><p>Rows: bicubic, model, anchored (yellow: anchor frames), HR.</p>
{figures or '<p>Neither run kept contact sheets of the shared windows.</p>'}"""
    return rh.page(f"{la} vs {lb}: VSR evaluation comparison", body)


def write_vsr_comparison(ra: dict, rb: dict, a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike, *,
                         labels: Sequence[str], allow_different_cases: bool = False) -> Path:
    """Writes ``OUT/compare.html``, ``OUT/compare.json`` and ``OUT/media/`` for vsr runs ``a`` and ``b``; returns the
    page (``compare.compare_runs`` reads the files and chooses the labels)."""
    cmp = compare_vsr_results(ra, rb, labels=labels, sources=(os.fspath(a), os.fspath(b)),
                              allow_different_cases=allow_different_cases)
    out = dir_path(out)
    atomic_write_text(out / "compare.json", json.dumps(_clean(cmp), indent=1, sort_keys=True) + "\n")
    wins = [w for w in cmp["windows"] if w["index"] is not None and w["index_b"] is not None]
    sheets_a = copy_sheets(out, workdir_of(a), "a", [w["index"] for w in wins], stem="window")
    sheets_b = copy_sheets(out, workdir_of(b), "b", [w["index_b"] for w in wins], stem="window")
    sheets = [(w, sheets_a.get(w["index"]), sheets_b.get(w["index_b"])) for w in wins
              if w["index"] in sheets_a or w["index_b"] in sheets_b]
    return atomic_write_text(out / "compare.html", _page(cmp, sheets))
