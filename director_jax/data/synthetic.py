"""Synthetic movies: shots of moving shapes with known trajectories, cut together with hard cuts.

They stand in for real films wherever a test, the CPU demo or an evaluation needs footage with a
ground truth: every object's centre is known in every frame (for trajectory error), every cut is
known (for shot detection), and the same seed always gives the same movie.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from director_jax.data.captions import format_multishot_caption
from director_jax.io_utils import atomic_write_text
from director_jax.video_io import write_mp4


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


# --- Real mp4 movies with their ground truth (for curation tests, the demo and evaluation) -----------

# Smallest cut score (``content_score``) between the last frame of a shot and the first of the next.
# PySceneDetect's ContentDetector cuts at 27 by default; shots of >= 8 frames at 48x64 change by at
# most ~15 from one frame to the next (measured over 300 random shots), so 45 leaves a wide margin on
# both sides, also after H.264 coding noise.
MIN_CUT_SCORE = 45.0


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> HSV on OpenCV's scales (H in [0, 180), S and V in [0, 255]), as float32."""
    rgb = rgb.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, c = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    s = np.where(v > 0, 255.0 * c / np.maximum(v, 1e-6), 0.0)
    cs = np.maximum(c, 1e-6)
    h = np.where(v == r, (g - b) / cs, np.where(v == g, 2.0 + (b - r) / cs, 4.0 + (r - g) / cs))
    h = np.where(c > 0, np.mod(h * 30.0, 180.0), 0.0)
    return np.stack([h, s, v], -1)


def content_score(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |HSV| difference of two uint8 RGB frames: PySceneDetect's ContentDetector score (default weights).

    Implemented in numpy (no OpenCV needed) so movies can be checked against a detector's threshold.
    """
    return float(np.abs(_hsv(np.asarray(a)) - _hsv(np.asarray(b))).mean())


def _uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.round((frames + 1.0) * 127.5), 0, 255).astype(np.uint8)


def distinct_shots(rng: np.random.Generator, shot_lengths: list[int], height: int, width: int,
                   max_shapes: int = 3, min_cut_score: float = MIN_CUT_SCORE) -> list[Shot]:
    """Shots drawn like ``make_movie``'s, each redrawn until the cut into it scores >= ``min_cut_score``.

    A hard cut between two near-identical frames is invisible to any content-based detector (and to
    a viewer); the redraw keeps every cut of a test movie a real, visible cut. Deterministic in rng.
    """
    shots: list[Shot] = []
    for k, n in enumerate(shot_lengths):
        for _ in range(1000):
            spec = random_shot(rng, n, height, width, max_shapes)
            if not shots:
                break
            first = render_shot(dataclasses.replace(spec, num_frames=1), height, width).frames[0]  # = frame 0
            if content_score(_uint8(shots[-1].frames[-1]), _uint8(first)) >= min_cut_score:
                break
        else:
            raise RuntimeError(f"shot {k}: no draw in 1000 gave a cut score >= {min_cut_score}; lower min_cut_score.")
        shots.append(render_shot(spec, height, width))
    return shots


_COLOR_NAMES = {
    "black": (-1, -1, -1), "white": (1, 1, 1), "grey": (0, 0, 0), "red": (1, -1, -1), "green": (-1, 1, -1),
    "blue": (-1, -1, 1), "yellow": (1, 1, -1), "cyan": (-1, 1, 1), "magenta": (1, -1, 1), "orange": (1, 0, -1),
    "purple": (0, -1, 1), "dark red": (0, -1, -1), "dark green": (-1, 0, -1), "navy": (-1, -1, 0),
    "olive": (0, 0, -1), "teal": (-1, 0, 0), "pink": (1, 0, 0.5),
}


def color_name(rgb) -> str:
    """The nearest (Euclidean in RGB) of a small palette of colour words to an RGB colour in [-1, 1]."""
    rgb = np.asarray(rgb, np.float64)
    return min(_COLOR_NAMES, key=lambda name: float(np.sum((np.asarray(_COLOR_NAMES[name]) - rgb) ** 2)))


def motion_words(velocity: tuple[float, float], num_frames: int | None = None, size: int | None = None) -> str:
    """'moves to the upper left', 'moves slowly right', ... from a (dy, dx) velocity in pixels/frame.

    y grows downwards (image rows). "slowly" (the object travels < 0.6 of the frame's short side
    over the shot) needs ``num_frames`` and ``size``; without them no speed word is given.
    """
    dy, dx = velocity
    horizontal = "left" if dx < 0 else "right"
    if abs(dy) < 0.4 * abs(dx):
        direction = horizontal
    elif abs(dx) < 0.4 * abs(dy):
        direction = "up" if dy < 0 else "down"
    else:
        direction = f"to the {'upper' if dy < 0 else 'lower'} {horizontal}"
    slow = num_frames is not None and size and float(np.hypot(dy, dx)) * num_frames / size < 0.6
    return f"moves {'slowly ' if slow else ''}{direction}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shot_caption(spec: ShotSpec, height: int | None = None, width: int | None = None) -> str:
    """A one-sentence description of a shot from its spec: what a good captioner should say of it.

    E.g. "a red circle moves to the upper left and a blue square moves down, on a navy background."
    With the frame size given, slow objects are called so.
    """
    size = min(height, width) if height and width else None
    things = []
    for s in spec.shapes:
        kind = "circle" if s["kind"] == "disc" else "square"
        color = color_name(s["color"])
        things.append(f"{_article(color)} {color} {kind} {motion_words(s['velocity'], spec.num_frames, size)}")
    top, bottom = color_name(spec.background_top), color_name(spec.background_bottom)
    background = f"{_article(top)} {top} background" if top == bottom else f"a {top} to {bottom} gradient background"
    return " and ".join(things) + f", on {background}."


@dataclasses.dataclass
class SyntheticMovieInfo:
    """What ``write_synthetic_movie`` wrote: the file, the frames as rendered and the ground truth."""

    path: str
    movie: Movie
    specs: list[ShotSpec]
    shot_captions: list[str]
    caption: str

    def truth(self) -> dict:
        """The content of ``<path>.truth.json``."""
        m = self.movie
        return {"shot_starts": list(m.shot_starts), "num_frames": int(m.frames.shape[0]), "fps": float(m.fps),
                "height": int(m.frames.shape[1]), "width": int(m.frames.shape[2]),
                "centers": [frame for c in m.centers for frame in c.round(3).tolist()],  # per frame: [[y, x], ...]
                "shot_captions": list(self.shot_captions), "caption": self.caption}


def truth_path(path: str | os.PathLike) -> str:
    """Where the ground truth of the synthetic movie at ``path`` is written."""
    return f"{os.fspath(path)}.truth.json"


def write_synthetic_movie(path: str | os.PathLike, seed: int, shot_lengths: list[int], height: int, width: int,
                          fps: float = 8.0, max_shapes: int = 3, crf: int = 12) -> SyntheticMovieInfo:
    """A real H.264 mp4 of shots with visible hard cuts, and ``<path>.truth.json`` beside it.

    The truth holds the cut frames, every object's centre per frame and the scene captions, so a
    test of shot detection, captioning or generation has something exact to compare with. Odd
    sizes are padded to even by the encoder (see ``write_mp4``); use even sizes for exact truth.
    """
    if not shot_lengths or min(shot_lengths) < 1:
        raise ValueError(f"shot_lengths must be positive frame counts, got {shot_lengths}.")
    shots = distinct_shots(np.random.default_rng(seed), list(shot_lengths), height, width, max_shapes)
    starts = np.concatenate([[0], np.cumsum(shot_lengths)[:-1]]).astype(int).tolist()
    movie = Movie(np.concatenate([s.frames for s in shots]), [s.centers for s in shots], starts, fps)
    specs = [s.spec for s in shots]
    captions = [shot_caption(s, height, width) for s in specs]
    info = SyntheticMovieInfo(os.fspath(path), movie, specs, captions, format_multishot_caption(captions))
    write_mp4(path, movie.frames, fps, crf=crf)
    atomic_write_text(truth_path(path), json.dumps(info.truth()))
    return info


def read_synthetic_truth(path: str | os.PathLike) -> dict:
    """The ground truth written beside a synthetic movie by ``write_synthetic_movie``."""
    p = Path(truth_path(path))
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist: {path} was not written by write_synthetic_movie "
                                "(or its .truth.json was removed).")
    return json.loads(p.read_text())
