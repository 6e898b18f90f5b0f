"""What both comparisons (``eval/compare.py`` for the generation suites, ``eval/compare_vsr.py`` for vsr) share:
reading a run's metrics.json, its suite, one metric's entry (A, B, B - A, which is better), copied contact sheets.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from director_jax.eval import report_html as rh
from director_jax.io_utils import atomic_write, dir_path


def workdir_of(run: str | os.PathLike) -> Path:
    """The evaluation workdir named by ``run``: the directory itself, or the one holding the given metrics.json."""
    path = dir_path(run)
    return path.parent if path.name == "metrics.json" else path


def read_metrics(run: str | os.PathLike) -> dict:
    """An evaluation workdir's ``metrics.json`` (or that file itself), with one-line errors for what is wrong."""
    path = workdir_of(run) / "metrics.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: {run} is not an evaluation workdir (python -m director_jax.evaluate "
                         "writes metrics.json there).")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); evaluate again to rewrite it.") from e
    if isinstance(results, dict) and suite_of(results) == "vsr":
        if not isinstance(results.get("sequences"), list) or not isinstance(results.get("windows"), list) \
                or not isinstance(results.get("aggregate"), dict):
            raise ValueError(f"{path} is not a vsr evaluation's metrics.json (no 'sequences' and 'windows' lists "
                             "and 'aggregate' table).")
        return results
    if not isinstance(results, dict) or not isinstance(results.get("cases"), list) \
            or not isinstance(results.get("aggregate"), dict):
        raise ValueError(f"{path} is not an evaluation's metrics.json (no 'cases' list and 'aggregate' table).")
    return results


def suite_of(results: Mapping[str, Any]) -> str | None:
    """The suite a metrics.json records: ``suite`` (the vsr suite) or ``run.suite`` (the generation suites)."""
    return results.get("suite") or (results.get("run") or {}).get("suite")


def check_suites(ra: Mapping[str, Any], rb: Mapping[str, Any], labels: Sequence[str]) -> None:
    """A one-line ``ValueError`` unless both runs are of one suite (a run recording none is a generation suite's)."""
    suites = [suite_of(r) for r in (ra, rb)]
    if (suites[0] == "vsr") != (suites[1] == "vsr"):
        kinds = [s if s == "vsr" else f"{s} (generation)" if s else "generation" for s in suites]
        raise ValueError(f"{labels[0]} is a {kinds[0]} evaluation and {labels[1]} a {kinds[1]} one: only runs of "
                         "one suite compare.")
    if None not in suites and suites[0] != suites[1]:
        raise ValueError(f"{labels[0]} evaluated the {suites[0]!r} suite and {labels[1]} the {suites[1]!r} suite: "
                         "only runs of one suite compare.")


def entry(key: str, a: Any, b: Any) -> dict:
    """One metric of both runs: the values, B - A, the metric's direction and the better run."""
    va, vb = rh.number(a), rh.number(b)
    return {"a": a, "b": b, "delta": None if va is None or vb is None else vb - va,
            "direction": rh.direction(key) or None, "better": rh.better(key, a, b)}


def delta(e: Mapping[str, Any]) -> str:
    """``B - A`` signed, coloured by which run is better."""
    d = e.get("delta")
    if d is None:
        return "—"
    text = f"{d:+.4f}" if abs(d) < 10 else f"{d:+.2f}"
    cls = {"b": "better", "a": "worse"}.get(e.get("better") or "", "")
    return f"<span class='{cls}'>{text}</span>" if cls else text


def better(e: Mapping[str, Any], labels: Sequence[str]) -> str:
    return {"a": html.escape(labels[0]), "b": html.escape(labels[1]), "same": "same"}.get(e.get("better") or "", "—")


def copy_sheets(out: Path, run: Path, side: str, indices: Sequence[int], stem: str = "case") -> dict[int, str]:
    """Each case's (``stem``'s) contact sheet of one run copied to ``OUT/media/<side>_<stem>_NNNN.png`` (where it has
    one)."""
    copied = {}
    for i in indices:
        src = run / "media" / f"{stem}_{i:04d}.png"
        if src.exists():
            data = src.read_bytes()
            atomic_write(out / "media" / f"{side}_{src.name}", lambda tmp, data=data: Path(tmp).write_bytes(data))
            copied[i] = f"media/{side}_{src.name}"
    return copied


def settings_warning(ra: Mapping[str, Any], rb: Mapping[str, Any], consequence: str) -> list[str]:
    """One warning listing the ``settings`` the two runs differ in (none when equal), ending in ``consequence``."""
    sa, sb = ra.get("settings") or {}, rb.get("settings") or {}
    differ = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if not differ:
        return []
    return [", ".join(f"{k}: {sa.get(k)!r} vs {sb.get(k)!r}" for k in differ).join(("settings differ (", "): "))
            + consequence]
