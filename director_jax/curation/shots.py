"""Shot boundaries and shot filters, computed in one streaming pass over small analysis frames.

PySceneDetect's detectors find the cuts (which one, and its threshold, come from the config's
``shots`` section). While the frames stream past, three numbers per frame are kept: mean luma,
mean absolute luma change from the previous frame (``motion``) and the fraction of pixels whose luma
changed by more than ``static_pixel_delta`` since the frame ``static_gap`` frames back (``drift``). That
is all the filters and the keyframe candidates need, so no frame is buffered beyond the last
``static_gap`` small luma planes: 12 bytes per frame of statistics.

Filters (the config's ``filters`` section), each with the reason it reports, checked in this order:

* ``too_short``: fewer than ``min_shot_frames`` frames.
* ``black``: mean luma below ``black_luma`` (0..255).
* ``fading``: one end of the shot is dark (mean luma of its first / last ``fade_window`` frames
  below ``fade_dark_luma``) and the other end at least ``fade_min_change`` brighter: a fade in or
  out, whose dark frames make poor keyframes and teach nothing about the shot.
* ``static``: nothing moves (a held frame, a title card): in the shot's median frame at most
  ``static_changed_fraction`` of the pixels changed by more than ``static_pixel_delta`` over
  ``static_gap`` frames. Counting pixels that changed a lot, rather than averaging changes, keeps
  film grain and codec noise (every pixel a little) from passing as motion while slow motion (a few
  pixels a lot, adding up over the gap) still counts.
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

DETECTORS = ("content", "adaptive", "histogram")


def section_dataclass(cls, section: Mapping[str, Any] | Any, name: str):
    """A frozen settings dataclass from a config section, naming unknown keys (typos) in the error."""
    items = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - names)
    if unknown:
        raise ValueError(f"config.{name} has unknown keys {unknown}; known keys: {sorted(names)}.")
    return cls(**items)


_INF = math.inf
_KINDS = {"int": int, "float": float}


def check_number(name: str, value: Any, kind: type, bounds: tuple[float, float] | None = None):
    """``value`` if it is a finite ``kind`` (int: no bool, no fraction) within ``bounds`` (inclusive); else a
    ValueError naming ``config.<name>`` in one line."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"config.{name} must be a number ({kind.__name__}), got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"config.{name} must be finite, got {value}.")
    if kind is int and value != int(value):
        raise ValueError(f"config.{name} must be an integer, got {value!r}.")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        lo, hi = bounds
        need = f">= {lo}" if hi == _INF else f"<= {hi}" if lo == -_INF else f"in [{lo}, {hi}]"
        raise ValueError(f"config.{name} must be {need}, got {value}.")
    return kind(value)


def check_numbers(obj: Any, section: str, bounds: Mapping[str, tuple[float, float]]) -> None:
    """Every int / float field of the settings dataclass ``obj`` finite, of its type, within ``bounds[field]``."""
    for f in dataclasses.fields(obj):
        kind = _KINDS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if kind is not None:
            check_number(f"{section}.{f.name}", getattr(obj, f.name), kind, bounds.get(f.name))


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Which PySceneDetect detector runs, with its settings (``config.shots``)."""

    detector: str = "content"
    content_threshold: float = 27.0  # ContentDetector: weighted HSV change (0..255) that makes a cut
    adaptive_threshold: float = 3.0  # AdaptiveDetector: change relative to its neighbours' average
    adaptive_min_content_val: float = 15.0
    adaptive_window: int = 2
    histogram_threshold: float = 0.1  # HistogramDetector: 1 - luma-histogram correlation
    histogram_bins: int = 256
    min_scene_frames: int = 4  # the detector's own minimum distance between two cuts
    analysis_width: int = 256  # frames are analysed at most this wide (PySceneDetect's default downscale)

    def __post_init__(self) -> None:
        check_numbers(self, "shots", {"content_threshold": (0, 255), "adaptive_threshold": (0, _INF),
                                      "adaptive_min_content_val": (0, 255), "adaptive_window": (1, _INF),
                                      "histogram_threshold": (0, 1), "histogram_bins": (2, 256),
                                      "min_scene_frames": (1, _INF), "analysis_width": (16, 16384)})
        if self.detector not in DETECTORS:
            raise ValueError(f"config.shots.detector={self.detector!r}; choose one of {DETECTORS}.")
        if self.min_scene_frames < 1 or self.analysis_width < 16:
            raise ValueError("config.shots.min_scene_frames must be >= 1 and analysis_width >= 16.")

    @classmethod
    def from_config(cls, section) -> DetectorConfig:
        return section_dataclass(cls, section, "shots")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """When a detected shot is dropped (``config.filters``); see the module doc."""

    min_shot_frames: int = 8
    black_luma: float = 16.0
    fade_dark_luma: float = 24.0
    fade_min_change: float = 40.0
    fade_window: int = 3
    static_pixel_delta: float = 12.0
    static_changed_fraction: float = 0.002
    static_gap: int = 4

    def __post_init__(self) -> None:
        check_numbers(self, "filters", {"min_shot_frames": (1, _INF), "black_luma": (0, 255),
                                        "fade_dark_luma": (0, 255), "fade_min_change": (0, 255),
                                        "fade_window": (1, _INF), "static_pixel_delta": (0, 255),
                                        "static_changed_fraction": (0, 1), "static_gap": (1, _INF)})
        if self.fade_window < 1 or not 1 <= self.static_gap < self.min_shot_frames:
            raise ValueError(f"config.filters: need fade_window >= 1 and 1 <= static_gap < min_shot_frames, got "
                             f"{self.fade_window}, {self.static_gap}, {self.min_shot_frames}.")

    @classmethod
    def from_config(cls, section) -> FilterConfig:
        return section_dataclass(cls, section, "filters")


def make_detector(cfg: DetectorConfig):
    """The PySceneDetect detector the config names."""
    from scenedetect import AdaptiveDetector, ContentDetector, HistogramDetector

    n = cfg.min_scene_frames
    if cfg.detector == "content":
        return ContentDetector(threshold=cfg.content_threshold, min_scene_len=n)
    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=n,
                                window_width=cfg.adaptive_window, min_content_val=cfg.adaptive_min_content_val)
    return HistogramDetector(threshold=cfg.histogram_threshold, bins=cfg.histogram_bins, min_scene_len=n)


def luma_bgr(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma (0..255, float32) of a uint8 BGR frame."""
    f = frame.astype(np.float32)
    return 0.114 * f[..., 0] + 0.587 * f[..., 1] + 0.299 * f[..., 2]


@dataclasses.dataclass
class FrameStats:
    """Per frame of a source (frame 0 has motion and drift 0; drift is 0 for the first ``gap`` frames)."""

    luma: np.ndarray  # (T,) float32: mean luma
    motion: np.ndarray  # (T,) float32: mean |luma_t - luma_{t-1}|
    drift: np.ndarray  # (T,) float32: fraction of pixels with |luma_t - luma_{t-gap}| > static_pixel_delta
    gap: int

    @property
    def num_frames(self) -> int:
        return int(self.luma.shape[0])


class StreamingShotDetector:
    """Feed uint8 BGR analysis frames in order with ``feed``; ``finish`` gives shot starts and statistics."""

    def __init__(self, cfg: DetectorConfig, fps: float, *, static_gap: int = 4, static_pixel_delta: float = 12.0):
        from scenedetect import FrameTimecode

        self.cfg, self.fps, self.gap, self.pixel_delta = cfg, float(fps), int(static_gap), float(static_pixel_delta)
        self._timecode = FrameTimecode
        self._detector = make_detector(cfg)
        self._cuts: list[int] = []
        self._luma, self._motion, self._drift = array("f"), array("f"), array("f")
        self._recent: deque[np.ndarray] = deque(maxlen=self.gap)  # the last `gap` luma planes

    def feed(self, bgr: np.ndarray) -> None:
        index = len(self._luma)
        y = luma_bgr(bgr)
        self._luma.append(float(y.mean()))
        self._motion.append(float(np.abs(y - self._recent[-1]).mean()) if self._recent else 0.0)
        full = len(self._recent) == self.gap
        self._drift.append(float((np.abs(y - self._recent[0]) > self.pixel_delta).mean()) if full else 0.0)
        self._recent.append(y)
        for cut in self._detector.process_frame(self._timecode(index, fps=self.fps), np.ascontiguousarray(bgr)):
            self._cuts.append(int(cut.frame_num))

    @property
    def num_frames(self) -> int:
        return len(self._luma)

    def finish(self) -> tuple[list[int], FrameStats]:
        """Shot starts (0 first, strictly increasing, inside the source) and the frame statistics."""
        if self.num_frames:
            end = self._timecode(self.num_frames - 1, fps=self.fps)
            self._cuts += [int(c.frame_num) for c in self._detector.post_process(end)]
        starts = sorted({0, *(c for c in self._cuts if 0 < c < self.num_frames)})
        stats = FrameStats(*(np.frombuffer(a, np.float32).copy() for a in (self._luma, self._motion, self._drift)),
                           gap=self.gap)
        self._recent.clear()
        return starts, stats


@dataclasses.dataclass(frozen=True)
class ShotVerdict:
    start: int
    end: int  # exclusive
    reason: str | None  # None: kept

    @property
    def length(self) -> int:
        return self.end - self.start


def shot_spans(shot_starts: list[int], num_frames: int) -> list[tuple[int, int]]:
    """[start, end) of every shot, the last ending at the source's end."""
    return list(zip(shot_starts, [*shot_starts[1:], num_frames], strict=True))


def judge_shot(start: int, end: int, stats: FrameStats, cfg: FilterConfig) -> str | None:
    """Why the shot [start, end) is dropped (see the module doc), or None to keep it."""
    n = end - start
    if n < cfg.min_shot_frames:
        return "too_short"
    y = stats.luma[start:end]
    if float(y.mean()) < cfg.black_luma:
        return "black"
    w = min(cfg.fade_window, n)
    head, tail = float(y[:w].mean()), float(y[-w:].mean())
    if min(head, tail) < cfg.fade_dark_luma and abs(head - tail) >= cfg.fade_min_change:
        return "fading"
    # Drift into the shot's first `gap` frames spans the cut: only changes within the shot count.
    drift = stats.drift[start + stats.gap:end]
    if drift.size and float(np.median(drift)) <= cfg.static_changed_fraction:
        return "static"
    return None


def judge_shots(shot_starts: Iterable[int], num_frames: int, stats: FrameStats,
                cfg: FilterConfig) -> list[ShotVerdict]:
    """A verdict for every shot of a source, in order."""
    return [ShotVerdict(s, e, judge_shot(s, e, stats, cfg)) for s, e in shot_spans(list(shot_starts), num_frames)]
