"""``WORKDIR/report.html`` of the CPU demo: headline numbers against their targets, stages, showcase media."""

from __future__ import annotations

import html
import json
from pathlib import Path

from director_jax.io_utils import atomic_write_text

KEYFRAME_PSNR_TARGET = 28.0
EXPORT_PSNR_TARGET = 40.0


def _f(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _check(ok: bool) -> str:
    return "<b style='color:#080'>met</b>" if ok else "<b style='color:#b00'>not met</b>"


# (label, metric key, digits) of the curated suite's table
_CURATED_ROWS = (
    ("PSNR, generated frames (dB)", "psnr", 2), ("LPIPS, generated frames", "lpips", 3),
    ("keyframe-frame PSNR (dB)", "keyframe_psnr", 2),
    ("cut precision (PySceneDetect on the video vs the true cuts)", "cut_precision", 2),
    ("cut recall", "cut_recall", 2), ("cut offset (frames, matched cuts)", "cut_offset_frames", 2),
    ("pacing: |frame closest to each keyframe - its frame|", "pacing_offset_frames", 2),
    ("pacing margin (dB at the asked frame over the best other)", "pacing_margin_db", 2),
    ("flicker (mean |2nd temporal difference|)", "flicker", 4), ("true clips' flicker", "flicker_reference", 4),
)


def _curated_section(ev: dict | None) -> str:
    """The curated suite's table (model vs cross-fade), its FVD and the PSNR-vs-distance plot."""
    if not ev:
        return ""
    m, x = ev["model"], ev["crossfade"]
    rows = "\n".join(f"<tr><td>{html.escape(label)}</td><td>{_f(m.get(k), d)}</td><td>{_f(x.get(k), d)}</td></tr>"
                     for label, k, d in _CURATED_ROWS)
    if m.get("fvd") is not None:
        rows += (f"<tr><td>FVD (95% bootstrap interval)</td><td>{_f(m['fvd'])} [{_f(m.get('fvd_ci_low'))}, "
                 f"{_f(m.get('fvd_ci_high'))}]</td><td>{_f(x.get('fvd'))}</td></tr>")
    curve = "\n".join(f"<tr><td>{d}</td><td>{n}</td><td>{_f(p)}</td><td>{_f(q)}</td></tr>" for d, n, p, q in zip(
        ev["by_distance"]["distance"], ev["by_distance"]["frames"], ev["by_distance"]["psnr"],
        ev["crossfade_by_distance"]["psnr"], strict=True))
    warnings = "".join(f"<p><i>{html.escape(w)}</i></p>" for w in ev.get("warnings", []))
    return f"""<h2>Curated suite (held-out footage curated like the training movies, {ev['cases']} cases)</h2>
<p>Windows of held-out curated clips: around a cut with keyframes at the shot starts, or 1 to 3 keyframes at drawn
frames (<code>python -m director_jax.evaluate --suite curated</code>; detail in
<a href="eval_curated/report.html">eval_curated/report.html</a>, the baseline's in
<a href="eval_curated_crossfade/report.html">eval_curated_crossfade/report.html</a>).</p>
<table><tr><th>measure</th><th>Director-Gen</th><th>cross-fade</th></tr>{rows}</table>{warnings}
<h3>PSNR against the distance to the nearest keyframe</h3>
<img src="eval_curated/media/distance.png">
<table><tr><th>frames from a keyframe</th><th>frames</th><th>Director-Gen PSNR (dB)</th><th>cross-fade PSNR (dB)</th>
</tr>{curve}</table>"""


def write_report(workdir: Path, s: dict) -> Path:
    ev = s["evaluation"]
    m, x = ev["model"], ev["crossfade"]
    kf_ok = m["keyframe_psnr"] >= KEYFRAME_PSNR_TARGET
    traj_ok = m["trajectory_error_px"] < x["trajectory_error_px"]
    exp = s.get("export")
    head = [
        ("keyframe-frame PSNR, held-out clips (dB)", _f(m["keyframe_psnr"]), f">= {KEYFRAME_PSNR_TARGET:g}",
         _check(kf_ok)),
        ("object trajectory error, generated frames (px)", _f(m["trajectory_error_px"]),
         f"< cross-fade {_f(x['trajectory_error_px'])}", _check(traj_ok)),
        ("object missing (fraction of generated frames)", _f(m["object_missing_fraction"], 3),
         f"cross-fade {_f(x['object_missing_fraction'], 3)}", ""),
        ("PSNR, generated frames (dB)", _f(m["psnr"]), f"cross-fade {_f(x['psnr'])}", ""),
        ("FVD (I3D, 16 frames at 224 px)", _f(m.get("fvd")), f"cross-fade {_f(x.get('fvd'))}", ""),
    ]
    if exp:
        head.append((f"PyTorch pipeline vs JAX video ({html.escape(exp['case'])}), PSNR (dB)", _f(exp["psnr_db"], 1),
                     f">= {EXPORT_PSNR_TARGET:g}", _check(exp["psnr_db"] >= EXPORT_PSNR_TARGET)))
    head_rows = "\n".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td><td>{d}</td></tr>" for a, b, c, d in head)
    templates = "\n".join(
        f"<tr><td>{html.escape(t)}</td><td>{_f(v['keyframe_psnr'])}</td><td>{_f(v['psnr'])}</td>"
        f"<td>{_f(v['trajectory_error_px'])}</td><td>{_f(ev['crossfade_by_template'][t]['trajectory_error_px'])}</td>"
        f"</tr>" for t, v in ev["by_template"].items())
    shows = s["showcase"]
    has_sr = any("sr_psnr" in r for r in shows)
    show_rows = "\n".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['given_frames']}</td><td>{len(r['chunks'])}</td>"
        f"<td>{_f(r['gen_given_psnr'])}</td><td>{_f(r['gen_generated_psnr'])}</td>"
        + ("".join(f"<td>{_f(r.get(k))}</td>" for k in ("sr_keyframe_psnr", "sr_psnr", "bicubic_psnr"))
           if has_sr else "") + "</tr>" for r in shows)
    sr_head = "<th>SR given frames (dB)</th><th>SR all frames (dB)</th><th>bicubic of Gen (dB)</th>" if has_sr else ""
    media = "\n".join(
        f"<div class=case><h3>{html.escape(r['name'])}</h3><p>given frames {r['given_frames']}; chunks "
        + "; ".join(f"{c['start']}..{c['start'] + c['length'] - 1}" for c in r["chunks"])
        + f"</p><video src='showcase/{r['file']}' controls loop muted width=256></video>"
        f"<br><img src='showcase/{r['sheet']}'></div>" for r in shows)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in s["timings_s"].items())
    vae, gen, sr = s["vae_fit"][-1], s["gen_train"]["history"][-1], s["sr_train"]["history"][-1]
    page = f"""<!doctype html><meta charset="utf-8"><title>director_jax CPU demo</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto;background:#fafafa}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}} img{{max-width:100%}}
.case{{margin-bottom:2em}}</style>
<h1>director_jax CPU demo</h1>
<p>Everything below was made by this run on {html.escape(s['devices'])} in {s['total_s']:.0f} s: synthetic movies
written as mp4, curated by the real pipeline ({s['curation']['samples']['total']} samples from
{s['curation']['sources']['done']} movies), the tiny Wan-architecture VAE, Director-Gen and Director-SR trained from
scratch, the showcase made by <code>python -m director_jax.generate</code>'s code and the numbers by
<code>python -m director_jax.evaluate</code>'s (held-out movies, fixed seeds; per-case detail in
<a href="eval/report.html">eval/report.html</a> and <a href="eval_crossfade/report.html">the baseline's</a>).
These are toy models trained for minutes: read the numbers as a working system, not as quality.</p>
<h2>Headline (held-out synthetic clips, {ev['cases']} cases)</h2>
<table><tr><th>measure</th><th>this run</th><th>target / reference</th><th></th></tr>{head_rows}</table>
<p>The cross-fade baseline blends linearly between the given keyframes; its keyframes are the true frames,
so its keyframe PSNR is not a comparison. Trajectory error: the centroid of the pixels nearest each object's colour
vs the ground-truth centre, on generated (non-keyframe) frames; a missing object counts as the frame diagonal.</p>
<h3>By case template</h3>
<table><tr><th>template</th><th>keyframe PSNR</th><th>PSNR generated</th><th>trajectory error (px)</th>
<th>cross-fade trajectory error (px)</th></tr>{templates}</table>
{_curated_section(ev.get("curated"))}
<h2>Training</h2>
<p>VAE: {vae['step']} steps, final L1 {vae['l1']:.4f}. Director-Gen: {gen['step']} steps, flow loss {gen['loss']:.4f}.
Director-SR: {sr['step']} steps, flow loss {sr['loss']:.4f}. Stage times: {html.escape(timings)}.</p>
<h2>Showcase (held-out movie; Gen at 32x32{', SR to 64x64 with the 64x64 keyframes' if has_sr else ''})</h2>
<table><tr><th>case</th><th>given frames</th><th>chunks</th><th>Gen given frames (dB)</th>
<th>Gen generated frames (dB)</th>{sr_head}</tr>{show_rows}</table>
<p>Each case's files are <code>showcase/NAME.mp4</code>, <code>.png</code> (given frames outlined in yellow) and
<code>.json</code> (the exact settings, to rerun with <code>python -m director_jax.generate --config gen/config.py
--ckpt gen</code>).</p>
{media}
<h2>Files</h2><pre>{html.escape(json.dumps({k: s[k] for k in ('timings_s', 'export')}, indent=1, default=str))}</pre>
"""
    return atomic_write_text(workdir / "report.html", page)
