"""Training samples from the kept shots of one source: single-shot windows and multi-shot runs.

* **single_shot**: every kept shot of at least ``single_shot.min_frames`` frames. A shot longer
  than ``single_shot.max_frames`` is split into consecutive windows of exactly ``max_frames``; a
  remainder of at least ``min_frames`` becomes one more (shorter) window, a smaller one is left out.
* **multi_shot**: runs of 2..``multi_shot.max_shots`` consecutive kept shots that are adjacent
  (no dropped shot between them: a hard cut the detector saw joins them, never a gap where a black
  or static shot was cut out). Middle shots are taken whole; with ``max_edge_frames`` > 0 the first
  shot contributes at most its last ``max_edge_frames`` frames and the last shot at most its first,
  so that long shots can still meet a cut inside the length limit. A run whose span is outside
  [``min_frames``, ``max_frames``] is not a sample. ``overlapping=False`` packs runs greedily
  (longest first) so that no frame is in two multi-shot samples.

Keyframe candidates are sample-relative frames: the shot starts (0 and every cut), ``num_even``
evenly spaced frames, and the ``num_motion_peaks`` frames of largest one-frame motion (at least
``min_peak_distance`` apart, never a cut frame whose motion spans the cut).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from director_jax.curation.shots import FrameStats, check_numbers, section_dataclass

_INF = math.inf


@dataclasses.dataclass(frozen=True)
class SingleShotConfig:
    enabled: bool = True
    min_frames: int = 16
    max_frames: int = 121

    def __post_init__(self) -> None:
        check_numbers(self, "single_shot", {"min_frames": (1, _INF), "max_frames": (1, _INF)})
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"config.single_shot: need 1 <= min_frames <= max_frames, got {self}.")


@dataclasses.dataclass(frozen=True)
class MultiShotConfig:
    enabled: bool = True
    max_shots: int = 3
    min_frames: int = 24
    max_frames: int = 241
    max_edge_frames: int = 0  # 0: whole shots only
    overlapping: bool = True

    def __post_init__(self) -> None:
        check_numbers(self, "multi_shot", {"max_shots": (2, _INF), "min_frames": (1, _INF), "max_frames": (1, _INF),
                                           "max_edge_frames": (0, _INF)})
        if self.max_shots < 2 or not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"config.multi_shot: need max_shots >= 2 and 1 <= min_frames <= max_frames, got {self}.")
        if self.max_edge_frames < 0:
            raise ValueError("config.multi_shot.max_edge_frames must be >= 0 (0: whole shots).")


@dataclasses.dataclass(frozen=True)
class KeyframeConfig:
    num_even: int = 5
    num_motion_peaks: int = 3
    min_peak_distance: int = 4

    def __post_init__(self) -> None:
        check_numbers(self, "keyframes", {"num_even": (0, 1024), "num_motion_peaks": (0, 1024),
                                          "min_peak_distance": (0, _INF)})


@dataclasses.dataclass(frozen=True)
class AssemblyConfig:
    single_shot: SingleShotConfig = SingleShotConfig()
    multi_shot: MultiShotConfig = MultiShotConfig()
    keyframes: KeyframeConfig = KeyframeConfig()

    @classmethod
    def from_config(cls, cfg) -> AssemblyConfig:
        """From a curation config (``cfg.single_shot``, ``cfg.multi_shot``, ``cfg.keyframes``)."""
        return cls(section_dataclass(SingleShotConfig, cfg.single_shot, "single_shot"),
                   section_dataclass(MultiShotConfig, cfg.multi_shot, "multi_shot"),
                   section_dataclass(KeyframeConfig, cfg.keyframes, "keyframes"))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample: source frames [start, end), its shot segments and keyframe candidates."""

    start: int
    end: int  # exclusive
    kind: str  # "single_shot" | "multi_shot"
    segments: tuple[tuple[int, int], ...]  # each shot's [start, end) inside the sample, source frames
    keyframe_candidates: dict  # "shot_starts", "even", "motion_peaks": sample-relative frames

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    @property
    def cuts(self) -> list[int]:
        """Shot starts strictly inside the sample, in source frames."""
        return [s for s, _ in self.segments[1:]]


def sample_id(source: str, start: int, end: int) -> str:
    """16 hex chars of sha1(f"{source}:{start}:{end}"): stable across reruns, so resume can dedupe."""
    return hashlib.sha1(f"{source}:{start}:{end}".encode()).hexdigest()[:16]


def even_frames(num_frames: int, count: int) -> list[int]:
    """``count`` evenly spaced frames of [0, num_frames), first and last included."""
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, count)})


def motion_peaks(motion: np.ndarray, count: int, min_distance: int, exclude: list[int]) -> list[int]:
    """Indices of the ``count`` largest values, greedily at least ``min_distance`` apart; ``exclude`` never."""
    m = np.asarray(motion, np.float64).copy()
    m[[i for i in exclude if 0 <= i < m.size]] = -np.inf
    chosen: list[int] = []
    for i in np.argsort(-m, kind="stable"):
        if len(chosen) == count or not np.isfinite(m[i]):
            break
        if all(abs(int(i) - c) >= min_distance for c in chosen):
            chosen.append(int(i))
    return sorted(chosen)


def _keyframes(start: int, end: int, segments, stats: FrameStats, cfg: KeyframeConfig) -> dict:
    shot_starts = [s - start for s, _ in segments]
    motion = stats.motion[start:end]
    return {"shot_starts": shot_starts,
            "even": even_frames(end - start, cfg.num_even),
            "motion_peaks": motion_peaks(motion, cfg.num_motion_peaks, cfg.min_peak_distance, shot_starts)}


def _single_windows(s: int, e: int, cfg: SingleShotConfig) -> list[tuple[int, int]]:
    windows = [(a, a + cfg.max_frames) for a in range(s, e - cfg.max_frames + 1, cfg.max_frames)]
    rest = windows[-1][1] if windows else s
    if e - rest >= cfg.min_frames:
        windows.append((rest, e))
    return windows


def _run_segments(run: list[tuple[int, int]], cfg: MultiShotConfig) -> list[tuple[int, int]] | None:
    segs = [list(x) for x in run]
    if cfg.max_edge_frames:
        segs[0][0] = max(segs[0][0], segs[0][1] - cfg.max_edge_frames)
        segs[-1][1] = min(segs[-1][1], segs[-1][0] + cfg.max_edge_frames)
    n = segs[-1][1] - segs[0][0]
    if not cfg.min_frames <= n <= cfg.max_frames:
        return None
    return [tuple(x) for x in segs]


def _adjacent_groups(kept: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    groups: list[list[tuple[int, int]]] = []
    for shot in kept:
        if groups and groups[-1][-1][1] == shot[0]:
            groups[-1].append(shot)
        else:
            groups.append([shot])
    return groups


def _multi_runs(group: list[tuple[int, int]], cfg: MultiShotConfig) -> list[list[tuple[int, int]]]:
    runs = []
    if cfg.overlapping:
        for i in range(len(group)):
            for n in range(2, cfg.max_shots + 1):
                if i + n <= len(group) and (segs := _run_segments(group[i:i + n], cfg)):
                    runs.append(segs)
        return runs
    i = 0
    while i < len(group):
        for n in range(min(cfg.max_shots, len(group) - i), 1, -1):
            if segs := _run_segments(group[i:i + n], cfg):
                runs.append(segs)
                i += n
                break
        else:
            i += 1
    return runs


def assemble(kept_shots: list[tuple[int, int]], stats: FrameStats, cfg: AssemblyConfig) -> list[Sample]:
    """All samples of one source from its kept shots (in order), sorted by (start, end)."""
    samples: list[Sample] = []
    if cfg.single_shot.enabled:
        for s, e in kept_shots:
            for a, b in _single_windows(s, e, cfg.single_shot):
                samples.append(Sample(a, b, "single_shot", ((a, b),), _keyframes(a, b, [(a, b)], stats, cfg.keyframes)))
    if cfg.multi_shot.enabled:
        for group in _adjacent_groups(list(kept_shots)):
            for segs in _multi_runs(group, cfg.multi_shot):
                a, b = segs[0][0], segs[-1][1]
                samples.append(Sample(a, b, "multi_shot", tuple(segs), _keyframes(a, b, segs, stats, cfg.keyframes)))
    return sorted(samples, key=lambda x: (x.start, x.end, x.kind))
