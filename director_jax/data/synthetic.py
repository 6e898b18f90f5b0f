"""Synthetic movies: shots of moving shapes with known trajectories, cut together with hard cuts.

They stand in for real films wherever a test, the CPU demo or an evaluation needs footage with a
ground truth: every object's centre is known in every frame (for trajectory error), every cut is
known (for shot detection), and the same seed always gives the same movie.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ShotSpec:
    """How one shot looks and moves; drawn at random by ``random_shot``."""

    num_frames: int
    background_top: tuple[float, float, float]  # RGB in [-1, 1]
    background_bottom: tuple[float, float, float]
    shapes: tuple[dict, ...]  # each: kind, color, radius, start (y, x), velocity (y, x) in pixels/frame


@dataclasses.dataclass
class Shot:
    frames: np.ndarray  # (T, H, W, 3) float32 in [-1, 1]
    centers: np.ndarray  # (T, num_shapes, 2) float32 (y, x) pixel coordinates
    spec: ShotSpec


@dataclasses.dataclass
class Movie:
    frames: np.ndarray  # (T, H, W, 3) float32 in [-1, 1]
    centers: list[np.ndarray]  # per shot: (shot frames, num_shapes, 2)
    shot_starts: list[int]  # frame index where each shot begins (0 first)
    fps: float


def random_shot(rng: np.random.Generator, num_frames: int, height: int, width: int,
                max_shapes: int = 3) -> ShotSpec:
    """A shot with a vertical-gradient background and 1..max_shapes shapes in steady motion."""
    top = tuple(rng.uniform(-0.9, 0.3, 3).round(3))
    bottom = tuple(np.clip(np.array(top) + rng.uniform(-0.4, 0.4, 3), -1, 1).round(3))
    shapes = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        radius = float(rng.uniform(0.12, 0.22) * min(height, width))
        start = (float(rng.uniform(radius, height - radius)), float(rng.uniform(radius, width - radius)))
        speed = rng.uniform(0.3, 1.2) * min(height, width) / max(num_frames, 1)
        angle = rng.uniform(0, 2 * np.pi)
        shapes.append({
            "kind": str(rng.choice(["disc", "square"])),
            "color": tuple(rng.uniform(0.2, 1.0, 3).round(3) * rng.choice([-1, 1], 3)),
            "radius": radius,
            "start": start,
            "velocity": (float(speed * np.sin(angle)), float(speed * np.cos(angle))),
        })
    return ShotSpec(num_frames, top, bottom, tuple(shapes))


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflects positions into [lo, hi] (objects bounce off the frame edges)."""
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def render_shot(spec: ShotSpec, height: int, width: int) -> Shot:
    """Draws a shot with anti-aliased edges; returns frames and exact object centres."""
    t = np.arange(spec.num_frames, dtype=np.float32)[:, None, None]
    yy = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xx = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    frac = (yy / height)[..., None]
    frames = (1 - frac) * np.asarray(spec.background_top, np.float32) + frac * np.asarray(
        spec.background_bottom, np.float32)
    frames = np.broadcast_to(frames, (spec.num_frames, height, width, 3)).copy()
    centers = np.zeros((spec.num_frames, len(spec.shapes), 2), np.float32)
    for i, s in enumerate(spec.shapes):
        r = s["radius"]
        cy = _bounce(s["start"][0] + s["velocity"][0] * t, r, height - r)
        cx = _bounce(s["start"][1] + s["velocity"][1] * t, r, width - r)
        centers[:, i, 0], centers[:, i, 1] = cy[:, 0, 0], cx[:, 0, 0]
        if s["kind"] == "disc":
            dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
        else:
            dist = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - r
        alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # one-pixel soft edge
        frames = (1 - alpha) * frames + alpha * np.asarray(s["color"], np.float32)
    return Shot(frames.astype(np.float32), centers, spec)


def make_movie(seed: int, shot_lengths: list[int], height: int, width: int, fps: float = 8.0,
               max_shapes: int = 3) -> Movie:
    """Shots of the given lengths joined by hard cuts; deterministic in ``seed``."""
    if not shot_lengths or min(shot_lengths) < 1:
        raise ValueError(f"shot_lengths must be positive frame counts, got {shot_lengths}.")
    rng = np.random.default_rng(seed)
    shots = [render_shot(random_shot(rng, n, height, width, max_shapes), height, width) for n in shot_lengths]
    starts = np.concatenate([[0], np.cumsum(shot_lengths)[:-1]]).astype(int).tolist()
    return Movie(np.concatenate([s.frames for s in shots]), [s.centers for s in shots], starts, fps)
