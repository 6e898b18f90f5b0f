"""report.html, the distance plots, cut marks on contact sheets and ``compare_runs``, on hand-made results (no model).

The results dicts follow metrics.json: the newer keys (cut and pacing metrics, ``by_distance``,
``warnings``, ``detected_cuts``) in one, today's older schema in another, so both stay readable.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from director_jax.eval.compare import compare_runs
from director_jax.eval.plots import distance_curves, metric_bars
from director_jax.eval.report import write_metrics, write_report
from director_jax.eval.suite import EvalCase
from director_jax.video_io import contact_sheet

CYAN, MAGENTA = (0, 255, 255), (255, 0, 255)
LABEL_W, PAD, HEADER = 110, 3, 16  # contact_sheet's layout


def _grey_video(levels: list[int], size: int = 8) -> np.ndarray:
    """Frames of one grey level each (uint8 value ``levels[t]`` after ``to_uint8``)."""
    values = np.asarray(levels, np.float32) / 127.5 - 1.0
    return np.broadcast_to(values[:, None, None, None], (len(levels), size, size, 3)).astype(np.float32)


def _case(index: int, cuts: tuple[int, ...] = (), frames: int = 12) -> EvalCase:
    ref = _grey_video([10 * t for t in range(frames)])
    return EvalCase(index=index, name=f"template {index % 2} / movie {index}", template=f"template {index % 2}",
                    movie_seed=index, start=0, fps=8.0, keyframes=(0, frames - 1), caption="a <test> clip",
                    reference=ref, cuts=cuts, truth=None)


def _curve(shift: float) -> dict:
    return {"distance": [0, 1, 2, 3], "frames": [4, 4, 4, 2], "psnr": [40.0 - shift, 30.0, 25.0 - shift, None],
            "ssim": [0.99, 0.9, 0.8, 0.7], "lpips": [0.01, 0.1 + shift / 100, 0.2, 0.3]}


def _new_results(shift: float = 0.0) -> dict:
    rows = []
    for i, cuts in ((0, ()), (1, (6,))):
        rows.append({**_case(i, cuts).describe(), "psnr": 23.456789 + i - shift, "ssim": 0.8, "lpips": 0.2 + shift,
                     "keyframe_psnr": 40.0, "cut_f1": 1.0 if i else None, "cut_precision": 0.5,
                     "detected_cuts": [7] if i else []})
    agg = {"psnr": 24.0 - shift, "ssim": 0.8, "lpips": 0.2 + shift, "keyframe_psnr": 40.0, "cut_precision": 0.5,
           "cut_recall": 1.0, "cut_f1": 0.6667, "cut_offset_frames": 1.0, "pacing_margin_db": 3.25, "flicker": 0.01,
           "flicker_reference": 0.02, "fvd": 123.456 + shift, "fvd_ci_low": 100.5, "fvd_ci_high": 150.25,
           "fvd_clips": 2, "trajectory_error_px": None}
    return {"cases": rows, "aggregate": agg,
            "by_template": {"template 0": dict(agg), "template 1": dict(agg)},
            "by_distance": _curve(shift), "by_distance_template": {"template 0": _curve(shift),
                                                                   "template 1": _curve(shift + 1)},
            "warnings": ["FVD from 2 clips (< 100): compare runs of this suite only"],
            "run": {"suite": "synthetic", "seed": 0}, "settings": {"fvd_size": 64}}


def _old_results() -> dict:
    """metrics.json as written before the cut / distance metrics (no new keys at all)."""
    rows = [{**_case(i).describe(), "psnr": 20.0 + i, "ssim": 0.7, "lpips": 0.3, "temporal_error": float("nan")}
            for i in range(2)]
    agg = {"psnr": 20.5, "ssim": 0.7, "lpips": 0.3, "temporal_error": float("nan"), "fvd": 99.0, "fvd_clips": 2}
    return {"cases": rows, "aggregate": agg, "by_template": {"template 0": agg, "template 1": agg},
            "run": {"suite": "synthetic"}, "settings": {}}


def _write_run(workdir: Path, results: dict, media_cases: int = 2) -> Path:
    cases = [_case(r["index"], tuple(r["cuts"])) for r in results["cases"]]
    videos = {c.index: c.reference[::-1].copy() for c in cases}
    write_metrics(workdir, results)
    write_report(workdir, results, cases, videos, title="test run", label="generated", run_info={"devices": 1},
                 media_cases=media_cases)
    return workdir


def _images(page: Path) -> list[Path]:
    sources = re.findall(r"<img src='([^']+)'", page.read_text())
    assert sources
    for src in sources:
        path = page.parent / src
        assert path.is_file(), src
        with Image.open(path) as img:
            img.verify()
    return [page.parent / s for s in sources]


def test_contact_sheet_marks_requested_and_detected_cuts(tmp_path):
    video = _grey_video([20 * t for t in range(12)])
    path = contact_sheet(tmp_path / "sheet.png", [("true", video), ("generated", video, [7])], marked=(0,),
                         scale=1, max_columns=3, cuts=(6,))
    sheet = np.asarray(Image.open(path).convert("RGB"))
    columns = [0, 4, 5, 6, 7, 8]  # every 4th frame, each cut and the frame before it
    assert sheet.shape[1] == LABEL_W + len(columns) * (8 + PAD)
    x = {f: LABEL_W + i * (8 + PAD) for i, f in enumerate(columns)}
    rows_y = [HEADER, HEADER + 8 + PAD]
    for f in columns:  # each column shows its own frame (grey level 20 f), away from the marks
        assert tuple(sheet[rows_y[0] + 4, x[f] + 5]) == (20 * f,) * 3, f
    assert tuple(sheet[5, x[6] + 1]) == CYAN  # the requested cut: above the first row ...
    assert tuple(sheet[rows_y[1] + 4, x[6] - 3]) == CYAN  # ... and in the gap before the frame, on every row
    assert tuple(sheet[rows_y[1] + 4, x[7] + 1]) == MAGENTA  # the detected cut, on the generated row only
    assert tuple(sheet[rows_y[0] + 4, x[7] + 1]) == (140,) * 3
    plain = np.asarray(Image.open(contact_sheet(tmp_path / "plain.png", [("true", video)], scale=1, max_columns=3)))
    assert plain.shape[1] == LABEL_W + 3 * (8 + PAD)  # no cuts: the columns of old


def test_plots_are_pngs_and_nothing_is_drawn_without_values(tmp_path):
    path = distance_curves(tmp_path / "d.png", {"a": _curve(0), "b": _curve(2)}, dashed=("b",))
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 150
    assert distance_curves(tmp_path / "none.png", {"a": {"distance": [0], "psnr": [None]}}) is None
    assert not (tmp_path / "none.png").exists()
    bars = metric_bars(tmp_path / "m.png", {"psnr": 1.0, "lpips": 0.2}, {"psnr": 2.0, "lpips": None}, ("A", "B"),
                       ["psnr", "lpips"])
    with Image.open(bars) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_report_shows_new_metrics_plots_warnings_and_cuts(tmp_path):
    workdir = _write_run(tmp_path / "run", _new_results())
    page = (workdir / "report.html").read_text()
    images = _images(workdir / "report.html")
    assert {p.name for p in images} == {"case_0000.png", "case_0001.png", "distance.png", "distance_templates.png"}
    assert "FVD from 2 clips (&lt; 100)" in page and "class='warn'" in page
    assert "<td>23.46</td>" in page and "123.46 [100.50, 150.25]" in page and "3.2500" in page
    assert "cut recall (asked cuts that were found)" in page and "a &lt;test&gt; clip" in page
    assert "<td>6</td><td>7</td>" in page  # case 1: cut asked at 6, found at 7
    assert "magenta" in page and "cyan" in page
    sheet = np.asarray(Image.open(workdir / "media" / "case_0001.png").convert("RGB"))
    assert (sheet == MAGENTA).all(-1).any() and (sheet == CYAN).all(-1).any()
    metrics = (workdir / "metrics.json").read_bytes()
    write_metrics(workdir, _new_results())
    assert (workdir / "metrics.json").read_bytes() == metrics


def test_report_of_the_old_schema(tmp_path):
    workdir = _write_run(tmp_path / "old", _old_results())
    assert {p.name for p in _images(workdir / "report.html")} == {"case_0000.png", "case_0001.png"}
    page = (workdir / "report.html").read_text()
    assert "<td>20.50</td>" in page and "class='warn'" not in page and "against distance" not in page
    assert json.loads((workdir / "metrics.json").read_text())["aggregate"]["temporal_error"] is None


def test_compare_runs(tmp_path):
    a = _write_run(tmp_path / "a", _new_results(0.0))
    b = _write_run(tmp_path / "b", _new_results(1.5), media_cases=1)
    html_path = compare_runs(a, b, tmp_path / "cmp")
    first = (tmp_path / "cmp" / "compare.json").read_bytes()
    compare_runs(a, b, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.json").read_bytes() == first
    cmp = json.loads(first)
    ra, rb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert cmp["labels"] == ["a", "b"]
    for key in ("psnr", "lpips", "fvd"):
        got = cmp["aggregate"][key]
        assert got["delta"] == pytest.approx(rb["aggregate"][key] - ra["aggregate"][key])
    assert cmp["aggregate"]["lpips"]["better"] == "a" and cmp["aggregate"]["psnr"]["better"] == "a"
    assert cmp["aggregate"]["ssim"]["better"] == "same" and cmp["aggregate"]["flicker_reference"]["better"] is None
    assert [c["index"] for c in cmp["cases"]] == [0, 1]  # equal PSNR changes: by index
    assert cmp["cases"][1]["psnr"]["delta"] == pytest.approx(rb["cases"][1]["psnr"] - ra["cases"][1]["psnr"])
    assert cmp["by_distance"]["psnr"]["delta"][:3] == pytest.approx([-1.5, 0.0, -1.5])
    names = {p.name for p in _images(html_path)}
    assert {"a_case_0000.png", "a_case_0001.png", "b_case_0000.png", "metrics.png", "distance.png",
            "distance_templates.png"} <= names and "b_case_0001.png" not in names
    assert "FVD from 2 clips" in html_path.read_text()


def test_compare_refuses_what_does_not_compare(tmp_path):
    a = tmp_path / "a"
    write_metrics(a, _new_results())
    other = _new_results()
    other["cases"][1]["cuts"] = [5]
    write_metrics(tmp_path / "b", other)
    with pytest.raises(ValueError, match=r"case 1 is 1 'template 1 / movie 1' \(keyframes \[0, 11\], cuts \[6\]"):
        compare_runs(a, tmp_path / "b", tmp_path / "out")
    out = compare_runs(a, tmp_path / "b", tmp_path / "out", allow_different_cases=True)
    cmp = json.loads((out.parent / "compare.json").read_text())
    assert [c["index"] for c in cmp["cases"]] == [0] and len(cmp["unpaired"]["b"]) == 1 and cmp["warnings"]
    curated = copy.deepcopy(_new_results())
    curated["run"]["suite"] = "curated"
    write_metrics(tmp_path / "c", curated)
    with pytest.raises(ValueError, match="'synthetic' suite and .* the 'curated' suite"):
        compare_runs(a, tmp_path / "c", tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        compare_runs(a, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        compare_runs(tmp_path / "bad", a, tmp_path / "out")


def test_compare_accepts_the_old_schema(tmp_path):
    write_metrics(tmp_path / "old", _old_results())
    newer = _old_results()
    newer["aggregate"]["psnr"] = 21.0
    write_metrics(tmp_path / "new", newer)
    out = compare_runs(tmp_path / "old" / "metrics.json", tmp_path / "new", tmp_path / "out", labels=("v1", "v2"))
    cmp = json.loads((out.parent / "compare.json").read_text())
    assert cmp["aggregate"]["psnr"]["delta"] == pytest.approx(0.5) and cmp["aggregate"]["psnr"]["better"] == "b"
    assert cmp["aggregate"]["temporal_error"]["delta"] is None and cmp["by_distance"] is None
    assert "v1" in out.read_text() and "Neither run kept contact sheets" in out.read_text()


# ------------------------------------------------------------------------------------------------
# compare_runs on two vsr runs (metrics.json as eval/vsr_run.py writes it)

VSR_METRICS = ("psnr_y", "psnr_rgb", "ssim_y", "lpips")


def _vsr_scores(psnr: float, lpips: float, frames: int) -> dict:
    return {"psnr_y": psnr, "psnr_rgb": psnr - 1.5, "ssim_y": 0.5 + psnr / 100, "lpips": lpips, "frames": frames}


def _vsr_results(model_psnr: dict[str, float], lpips: float = 0.3, names: tuple[str, ...] = ("calendar", "city"),
                 with_model: bool = True) -> dict:
    """A two-method vsr metrics.json: each sequence one window of 5 frames, anchor at frame 0."""
    seqs, windows = [], []
    for i, name in enumerate(names):
        methods = {"bicubic": _vsr_scores(20.0 + i, 0.5, 5)}
        if with_model:
            methods["model"] = _vsr_scores(model_psnr[name], lpips, 5)
            methods["model_anchored"] = _vsr_scores(model_psnr[name] + 1.0, lpips - 0.05, 4)
        windows.append({"index": i, "sequence": name, "start": 0, "frames": 5, "anchors": [0], "metrics": methods})
        seqs.append({"name": name, "hr_size": [64, 64], "lr_size": [16, 16], "crop_hr": [0, 0, 64, 64],
                     "lr": "BI (bicubic downscale)", "windows": [i], "frames": 5, "metrics": methods,
                     "metrics_non_anchor": methods})

    def mean(method: str) -> dict:
        rows = [s["metrics"][method] for s in seqs if method in s["metrics"]]
        out = {k: float(np.mean([r[k] for r in rows])) for k in VSR_METRICS}
        return {**out, "frames": sum(r["frames"] for r in rows), "sequences": len(rows)}

    agg = {m: mean(m) for m in seqs[0]["metrics"]}
    return {"suite": "vsr", "aggregate": agg, "aggregate_non_anchor": copy.deepcopy(agg), "sequences": seqs,
            "windows": windows, "skipped": [], "settings": {"scale": 4, "crop_border": 4, "anchors": ["#0"]},
            "run": {"data": "/data/vid", "evaluated": {"baseline": None, "step": 10}}}


def test_compare_vsr_runs(tmp_path):
    ra = _vsr_results({"calendar": 22.0, "city": 25.0}, lpips=0.30)
    rb = _vsr_results({"calendar": 22.5, "city": 23.0}, lpips=0.25)
    write_metrics(tmp_path / "a", ra)
    write_metrics(tmp_path / "b", rb)
    contact_sheet(tmp_path / "a" / "media" / "window_0001.png", [("HR", _grey_video([0, 100]))], scale=1)
    page = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "cmp")
    first = (tmp_path / "cmp" / "compare.json").read_bytes()
    compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.json").read_bytes() == first
    cmp = json.loads(first)
    assert cmp["suite"] == "vsr" and cmp["labels"] == ["a", "b"] and not cmp["warnings"]
    assert list(cmp["aggregate"]) == ["bicubic", "model", "model_anchored"]
    for method in ("bicubic", "model", "model_anchored"):
        for key in VSR_METRICS:
            got = cmp["aggregate"][method][key]
            want = rb["aggregate"][method][key] - ra["aggregate"][method][key]
            assert (got["a"], got["b"]) == (ra["aggregate"][method][key], rb["aggregate"][method][key])
            assert got["delta"] == pytest.approx(want), (method, key)
    model = cmp["aggregate"]["model"]
    assert model["psnr_y"]["delta"] == pytest.approx(-0.75) and model["psnr_y"]["better"] == "a"
    assert model["lpips"]["direction"] == "lower" and model["lpips"]["better"] == "b"  # lower LPIPS in b
    assert model["ssim_y"]["direction"] == "higher" and model["frames"]["better"] is None
    assert cmp["aggregate"]["bicubic"]["psnr_y"]["better"] == "same"
    # per sequence: city's model PSNR-Y moved by -2, calendar's by +0.5 -> city first
    assert [s["name"] for s in cmp["sequences"]] == ["city", "calendar"]
    assert [s["metrics"]["model"]["psnr_y"]["delta"] for s in cmp["sequences"]] == pytest.approx([-2.0, 0.5])
    assert cmp["windows"][1]["metrics"]["model"]["lpips"]["delta"] == pytest.approx(0.25 - 0.30)
    text = page.read_text()
    assert "Sequences, largest model PSNR-Y change first" in text and "Non-anchor frames only" in text
    assert text.index("<td>city</td>") < text.index("<td>calendar</td>") and "class='better'" in text
    assert [p.name for p in _images(page)] == ["a_window_0001.png"]  # b kept no sheets


def test_compare_vsr_refuses_what_does_not_compare(tmp_path):
    write_metrics(tmp_path / "a", _vsr_results({"calendar": 22.0, "city": 25.0}))
    write_metrics(tmp_path / "b", _vsr_results({"calendar": 22.0, "walk": 25.0}, names=("calendar", "walk")))
    with pytest.raises(ValueError, match=r"sequence 1 is 'city' in a but 'walk' in b") as err:
        compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "out")
    assert "\n" not in str(err.value)
    out = compare_runs(tmp_path / "a", tmp_path / "b", tmp_path / "out", allow_different_cases=True)
    cmp = json.loads((out.parent / "compare.json").read_text())
    assert [s["name"] for s in cmp["sequences"]] == ["calendar"] and cmp["warnings"]
    assert cmp["unpaired"]["sequences"] == {"a": ["city"], "b": ["walk"]}
    shifted = _vsr_results({"calendar": 22.0, "city": 25.0})
    shifted["windows"][1]["start"] = 3
    write_metrics(tmp_path / "c", shifted)
    with pytest.raises(ValueError, match=r"window 1 is 1 'city' frames 0\.\.4 .* but 1 'city' frames 3\.\.7"):
        compare_runs(tmp_path / "a", tmp_path / "c", tmp_path / "out")
    write_metrics(tmp_path / "gen", _new_results())
    with pytest.raises(ValueError, match=r"a is a vsr evaluation and gen a synthetic \(generation\) one") as err:
        compare_runs(tmp_path / "a", tmp_path / "gen", tmp_path / "out")
    assert "\n" not in str(err.value)
    write_metrics(tmp_path / "old", _old_results() | {"run": {}})
    with pytest.raises(ValueError, match="old is a generation evaluation and a a vsr one"):
        compare_runs(tmp_path / "old", tmp_path / "a", tmp_path / "out")


def test_compare_vsr_baseline_against_a_model_run(tmp_path):
    write_metrics(tmp_path / "bicubic", _vsr_results({}, with_model=False))
    write_metrics(tmp_path / "sr", _vsr_results({"calendar": 22.0, "city": 25.0}))
    out = compare_runs(tmp_path / "bicubic", tmp_path / "sr", tmp_path / "out", labels=("bic", "sr"))
    cmp = json.loads((out.parent / "compare.json").read_text())
    assert cmp["aggregate"]["bicubic"]["psnr_y"]["delta"] == 0.0
    assert cmp["aggregate"]["model"]["psnr_y"] == {"a": None, "b": 23.5, "delta": None, "direction": "higher",
                                                   "better": None}
    assert "bic" in out.read_text() and "Neither run kept contact sheets" in out.read_text()
