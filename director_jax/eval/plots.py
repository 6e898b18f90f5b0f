"""PNG plots for the evaluation pages: fidelity against distance from the nearest keyframe, metric bars.

A keyframe-conditioned model is exact near its keyframes and drifts between them; how fast it drifts
is what one curve per run or template shows. Figures are drawn on their own Agg canvas (no pyplot,
no global backend), written atomically (``io_utils.atomic_write``). Matplotlib is imported on first
use, with its loggers at ERROR, so ``import director_jax.eval.report`` stays light and font-cache
notices stay off the console. Plots never go into ``metrics.json``, which must stay byte-identical.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from director_jax.io_utils import atomic_write

_TITLES = {"psnr": ("PSNR (dB)", "higher"), "ssim": ("SSIM", "higher"), "lpips": ("LPIPS", "lower")}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Matplotlib's loggers at ERROR while drawing (font cache builds, findfont fallbacks)."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else math.nan
            for v in values]


def _save(fig: Any, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def distance_curves(path: str | os.PathLike, curves: Mapping[str, Mapping[str, Any]],
                    metrics: Sequence[str] = ("psnr", "ssim", "lpips"), *, title: str = "",
                    dashed: Collection[str] = (), groups: Mapping[str, str] | None = None) -> Path | None:
    """One panel per metric: x = frames from the nearest keyframe, one line per labelled curve.

    Each curve is a ``by_distance`` dict (``{"distance": [...], "psnr": [...], ...}``; None values are
    gaps). Curves named in ``dashed`` are drawn dashed; curves with one ``groups`` value share a colour
    (run A solid, run B dashed, one colour per template). Returns None (and writes nothing) when no
    panel has a finite value.
    """
    panels = [m for m in metrics
              if any(any(math.isfinite(v) for v in _finite(c.get(m) or ())) for c in curves.values())]
    if not panels:
        return None
    with _quiet():
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        colour_keys = list(dict.fromkeys((groups or {}).get(k, k) for k in curves))
        for ax, metric in zip(axes, panels, strict=True):
            for name, curve in curves.items():
                x, y = list(curve.get("distance") or ()), _finite(curve.get(metric) or ())
                n = min(len(x), len(y))
                if not n or not any(math.isfinite(v) for v in y[:n]):
                    continue
                colour = f"C{colour_keys.index((groups or {}).get(name, name)) % 10}"
                ax.plot(x[:n], y[:n], marker="o", markersize=3, color=colour, label=name,
                        linestyle="--" if name in dashed else "-")
            unit, way = _TITLES.get(metric, (metric, ""))
            ax.set_title(f"{unit}" + (f" ({way} is better)" if way else ""), fontsize=10)
            ax.set_xlabel("frames from the nearest keyframe")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=11)
        return _save(fig, path)


def metric_bars(path: str | os.PathLike, a: Mapping[str, Any], b: Mapping[str, Any], labels: Sequence[str],
                metrics: Sequence[str], names: Mapping[str, str] | None = None) -> Path | None:
    """Two runs' values side by side, one small panel per metric (each on its own scale).

    Metrics missing (or not finite) in either run are left out; returns None when none remain.
    """
    shown = [m for m in metrics if all(math.isfinite(v) for v in _finite([a.get(m), b.get(m)]))]
    if not shown:
        return None
    with _quiet():
        from matplotlib.figure import Figure

        cols = min(len(shown), 4)
        rows = -(-len(shown) // cols)
        fig = Figure(figsize=(3.0 * cols, 2.6 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax, metric in zip(axes, shown, strict=False):
            values = [float(a[metric]), float(b[metric])]
            ax.bar([0, 1], values, color=["C0", "C1"], tick_label=list(labels[:2]))
            ax.set_title((names or {}).get(metric, metric), fontsize=8)
            ax.tick_params(labelsize=8)
        for ax in axes[len(shown):]:
            ax.set_visible(False)
        return _save(fig, path)
