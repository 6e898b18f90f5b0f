"""Two evaluation runs side by side: ``compare.html`` and ``compare.json`` from their ``metrics.json``.

Deltas are B - A, and "better" follows each metric's direction (``report_html.LABELS``), so a
change of checkpoint, sampler or model reads as one table. Runs of different suites are refused,
and so are runs of different case lists (a mean over other cases is another number) unless
``allow_different_cases``: then cases are paired by what they ask for (name, keyframes, cuts,
length) and the rest listed. ``compare.json`` is a pure function of the two ``metrics.json`` files,
the labels and the paths given (byte-identical between calls); both runs' contact sheets are copied
into ``OUT/media`` so the page stands alone. Every file is written atomically. Two runs of the ``vsr``
suite compare by method and metric instead (``eval/compare_vsr.py``).
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
    read_metrics,
    settings_warning,
    suite_of,
    workdir_of,
)
from director_jax.eval.compare_vsr import write_vsr_comparison
from director_jax.eval.plots import distance_curves, metric_bars
from director_jax.eval.report import _clean
from director_jax.io_utils import atomic_write_text, dir_path

CASE_METRICS = ("psnr", "lpips")  # the per-case table's columns (every shared metric is in compare.json)


def case_key(row: Mapping[str, Any]) -> tuple:
    """What a case asks for: its name (or clip), keyframes, cuts and length; equal keys are the same case."""
    return (rh.case_name(row), tuple(row.get("keyframes") or ()), tuple(row.get("cuts") or ()), row.get("frames"))


def _describe(row: Mapping[str, Any]) -> str:
    name, keys, cuts, frames = case_key(row)
    return f"{row.get('index')} {name!r} (keyframes {list(keys)}, cuts {list(cuts)}, {frames} frames)"


def pair_cases(a: Sequence[dict], b: Sequence[dict], labels: Sequence[str], allow_different_cases: bool
               ) -> tuple[list[tuple[dict, dict]], list[dict], list[dict]]:
    """(paired case rows, rows only in A, rows only in B); a ``ValueError`` naming the first difference unless
    ``allow_different_cases``."""
    if not allow_different_cases:
        for i, (ra, rb) in enumerate(zip(a, b, strict=False)):
            if (ra.get("index"), *case_key(ra)) != (rb.get("index"), *case_key(rb)):
                raise ValueError(f"the runs evaluate different cases: case {i} is {_describe(ra)} in {labels[0]} but "
                                 f"{_describe(rb)} in {labels[1]}; pass allow_different_cases=True to compare the "
                                 "cases they share.")
        if len(a) != len(b):
            extra = (a if len(a) > len(b) else b)[min(len(a), len(b))]
            raise ValueError(f"{labels[0]} has {len(a)} cases and {labels[1]} {len(b)} (first unpaired: "
                             f"{_describe(extra)}); pass allow_different_cases=True to compare the cases they share.")
    by_key = {case_key(r): r for r in b}
    pairs = [(r, by_key[case_key(r)]) for r in a if case_key(r) in by_key]
    paired = {case_key(r) for r, _ in pairs}
    return pairs, [r for r in a if case_key(r) not in paired], [r for r in b if case_key(r) not in paired]


def _table_entries(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict]:
    return {k: entry(k, a.get(k), b.get(k)) for k in rh.metric_keys(a, b)}


def _distance(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict | None:
    """Both runs' distance curves on the distances they share, with B - A."""
    if not a or not b:
        return None
    da, db = list(a.get("distance") or ()), list(b.get("distance") or ())
    shared = [d for d in da if d in db]
    out: dict[str, Any] = {"distance": shared}
    for k in ("frames", "psnr", "ssim", "lpips"):
        va = [(a.get(k) or [None] * len(da))[da.index(d)] for d in shared]
        vb = [(b.get(k) or [None] * len(db))[db.index(d)] for d in shared]
        out[k] = {"a": va, "b": vb} if k == "frames" else {
            "a": va, "b": vb, "delta": [entry(k, x, y)["delta"] for x, y in zip(va, vb, strict=True)]}
    return out


def _warnings(ra: Mapping[str, Any], rb: Mapping[str, Any], labels: Sequence[str], only_a: list, only_b: list
              ) -> list[str]:
    out = settings_warning(ra, rb, "the metrics they set (FVD, LPIPS) are not comparable between the runs.")
    if only_a or only_b:
        out.append(f"{len(only_a)} cases only in {labels[0]} and {len(only_b)} only in {labels[1]}: aggregates and "
                   "per-template means are over different cases; per-case deltas cover the shared cases only.")
    return out


def compare_results(ra: dict, rb: dict, *, labels: Sequence[str], sources: Sequence[str] = ("", ""),
                    allow_different_cases: bool = False) -> dict:
    """The content of ``compare.json`` for two ``metrics.json`` dicts (a ``ValueError`` for runs not comparable)."""
    check_suites(ra, rb, labels)
    pairs, only_a, only_b = pair_cases(ra["cases"], rb["cases"], labels, allow_different_cases)
    cases = []
    for ca, cb in pairs:
        cases.append({**_table_entries(ca, cb), "index": ca.get("index"), "index_b": cb.get("index"),
                      "name": rh.case_name(ca), "template": ca.get("template")})

    def change(row: dict, key: str) -> float:
        d = row.get(key, {}).get("delta")
        return -1.0 if d is None else abs(d)

    cases.sort(key=lambda r: (-change(r, "psnr"), -change(r, "lpips"), r["index"] if r["index"] is not None else -1))
    ta, tb = ra.get("by_template") or {}, rb.get("by_template") or {}
    dta, dtb = ra.get("by_distance_template") or {}, rb.get("by_distance_template") or {}
    return {
        "labels": list(labels),
        "runs": [{"label": lab, "source": src, "suite": (r.get("run") or {}).get("suite"),
                  "evaluated": (r.get("run") or {}).get("evaluated"), "cases": len(r["cases"]),
                  "warnings": list(r.get("warnings") or ())}
                 for lab, src, r in zip(labels, sources, (ra, rb), strict=True)],
        "aggregate": _table_entries(ra["aggregate"], rb["aggregate"]),
        "by_template": {t: _table_entries(ta[t], tb[t]) for t in ta if t in tb},
        "by_distance": _distance(ra.get("by_distance"), rb.get("by_distance")),
        "by_distance_template": {t: _distance(dta[t], dtb[t]) for t in dta if t in dtb},
        "cases": cases,
        "unpaired": {"a": [_describe(r) for r in only_a], "b": [_describe(r) for r in only_b]},
        "warnings": _warnings(ra, rb, labels, only_a, only_b),
    }


def _page(cmp: dict, ra: dict, rb: dict, plots: list[tuple[str, str]], sheets: list[tuple[dict, str, str]]) -> str:
    la, lb = cmp["labels"]
    agg_a, agg_b = ra["aggregate"], rb["aggregate"]
    aggregate = [[html.escape(rh.label(k)), rh.fmt_metric(k, agg_a), rh.fmt_metric(k, agg_b), delta(e),
                  rh.direction(k) or "—", better(e, cmp["labels"])] for k, e in cmp["aggregate"].items()]
    keys = [k for k in rh.metric_keys(*(ra.get("by_template") or {}).values()) if k not in ("fvd", "fvd_clips")]
    templates = [[html.escape(t), *(f"{rh.fmt(m[k]['a'])} → {rh.fmt(m[k]['b'])} ({delta(m[k])})"
                                    if k in m else "—" for k in keys)] for t, m in cmp["by_template"].items()]
    shown = [k for k in CASE_METRICS if any(k in c for c in cmp["cases"])]
    cases = [[str(c["index"]), html.escape(c["name"]),
              *(x for k in shown for x in (rh.fmt(c.get(k, {}).get("a")), rh.fmt(c.get(k, {}).get("b")),
                                           delta(c.get(k, {}))))] for c in cmp["cases"]]
    diff = f"{lb} − {la}"
    case_head = ["#", "case", *(f"{lab} {k}" for k in shown for lab in (la, lb, diff))]
    runs = "".join(f"<li><b>{html.escape(r['label'])}</b>: {html.escape(r['source'])} ({r['cases']} cases"
                   + (f"; {html.escape(json.dumps(r['evaluated']))}" if r["evaluated"] else "") + ")</li>"
                   for r in cmp["runs"])
    wa, wb = (r["warnings"] for r in cmp["runs"])
    warn = rh.warnings_box(cmp["warnings"], "Comparison") + (
        rh.warnings_box(wa, f"Warnings of {la} and {lb}") if wa == wb else
        rh.warnings_box(wa, f"Warnings of {la}") + rh.warnings_box(wb, f"Warnings of {lb}"))
    images = "\n".join(f"<h3>{html.escape(n)}</h3><img src='{p}' alt='{html.escape(n)}'>" for n, p in plots)
    figures = "\n".join(f"<h3>case {c['index']}: {html.escape(c['name'])}</h3>"
                        + "".join(f"<p>{html.escape(lab)}</p><img src='{p}' alt='{html.escape(lab)} contact sheet'>"
                                  for lab, p in ((la, pa), (lb, pb)) if p) for c, pa, pb in sheets)
    body = f"""<h1>Comparison: {html.escape(la)} vs {html.escape(lb)}</h1>
<ul>{runs}</ul>
<p>Deltas are {html.escape(lb)} − {html.escape(la)}; green: {html.escape(lb)} is better by the metric's direction,
red: worse. Suite: {html.escape(str(cmp['runs'][0]['suite']))}.</p>
{warn}
<h2>Summary</h2>
{rh.table(['metric', la, lb, diff, 'better when', 'better run'], aggregate)}
{images}
<h2>By template ({html.escape(la)} → {html.escape(lb)} ({html.escape(diff)}))</h2>
{rh.table(['template', *map(rh.label, keys)], templates)}
<h2>Cases, largest PSNR change first</h2>
{rh.table(case_head, cases)}
<h2>Contact sheets</h2>
{rh.cut_legend()}
{figures or '<p>Neither run kept contact sheets of the shared cases.</p>'}"""
    return rh.page(f"{la} vs {lb}: evaluation comparison", body)


def _plots(out: Path, cmp: dict, ra: dict, rb: dict) -> list[tuple[str, str]]:
    la, lb = cmp["labels"]
    plots = []
    bars = metric_bars(out / "media" / "metrics.png", ra["aggregate"], rb["aggregate"], (la, lb),
                       [k for k in cmp["aggregate"] if rh.direction(k) in ("higher", "lower")],
                       {k: f"{rh.label(k)} ({'↑' if rh.direction(k) == 'higher' else '↓'})" for k in cmp["aggregate"]})
    if bars is not None:
        plots.append(("summary", "media/metrics.png"))
    if ra.get("by_distance") and rb.get("by_distance"):
        path = distance_curves(out / "media" / "distance.png", {la: ra["by_distance"], lb: rb["by_distance"]},
                               title="all cases", dashed=(lb,))
        if path is not None:
            plots.append(("fidelity against distance from the nearest keyframe", "media/distance.png"))
    curves, groups, dashed = {}, {}, []
    for t in cmp["by_distance_template"]:
        for lab, r in ((la, ra), (lb, rb)):
            curves[f"{lab}: {t}"] = r["by_distance_template"][t]
            groups[f"{lab}: {t}"] = t
        dashed.append(f"{lb}: {t}")
    if curves and distance_curves(out / "media" / "distance_templates.png", curves, title="by template",
                                  dashed=dashed, groups=groups) is not None:
        plots.append((f"by template ({la} solid, {lb} dashed)", "media/distance_templates.png"))
    return plots


def compare_runs(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike, *,
                 labels: Sequence[str] | None = None, allow_different_cases: bool = False) -> Path:
    """Writes ``OUT/compare.html``, ``OUT/compare.json`` and ``OUT/media/`` for runs ``a`` and ``b``; returns the page.

    ``labels`` default to the workdirs' names ("A" / "B" where those are equal).
    """
    ra, rb = read_metrics(a), read_metrics(b)
    if labels is None:
        names = [workdir_of(x).name for x in (a, b)]
        labels = names if names[0] != names[1] and all(names) else ["A", "B"]
    labels = [str(x) for x in labels]
    if len(labels) != 2:
        raise ValueError(f"labels={labels}: give two, one per run.")
    if "vsr" in (suite_of(ra), suite_of(rb)):
        return write_vsr_comparison(ra, rb, a, b, out, labels=labels, allow_different_cases=allow_different_cases)
    cmp = compare_results(ra, rb, labels=labels, sources=(os.fspath(a), os.fspath(b)),
                          allow_different_cases=allow_different_cases)
    out = dir_path(out)
    atomic_write_text(out / "compare.json", json.dumps(_clean(cmp), indent=1, sort_keys=True) + "\n")
    plots = _plots(out, cmp, ra, rb)
    in_order = sorted(cmp["cases"], key=lambda c: (c["index"] is None, c["index"] or 0))
    sheets_a = copy_sheets(out, workdir_of(a), "a", [c["index"] for c in in_order if c["index"] is not None])
    sheets_b = copy_sheets(out, workdir_of(b), "b", [c["index_b"] for c in in_order if c["index_b"] is not None])
    sheets = [(c, sheets_a.get(c["index"]), sheets_b.get(c["index_b"])) for c in in_order
              if c["index"] in sheets_a or c["index_b"] in sheets_b]
    return atomic_write_text(out / "compare.html", _page(cmp, ra, rb, plots, sheets))
