"""``python -m director_jax.movies --out movies/ [--count 24] [--stills 0,16]``: synthetic movies to try the system on.

Writes ``count`` real H.264 mp4 files of moving shapes with hard cuts (seeds ``seed``, ``seed + 1``,
...), each with ``<movie>.mp4.truth.json`` beside it (cut frames, every object's centre per frame,
scene captions), so every step of the walkthrough in ``docs/guide.md`` can run with no footage of
one's own and be checked against the truth. ``--stills`` also saves chosen frames of every movie as
PNG (``<movie>_f<frame>.png``): keyframes for ``python -m director_jax.generate``. Files already
written with the same settings are kept, so a rerun only adds what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image
from tqdm import tqdm

from director_jax import cli
from director_jax.data.synthetic import truth_path, write_synthetic_movie
from director_jax.errors import UserError
from director_jax.io_utils import atomic_write, atomic_write_text, writable_dir_problem

_OUT = flags.DEFINE_string("out", None, "Directory to write the movies into.")
_COUNT = flags.DEFINE_integer("count", 24, "How many movies.")
_SEED = flags.DEFINE_integer("seed", 1000, "Seed of the first movie (the others: seed + 1, ...).")
_SIZE = flags.DEFINE_integer("size", 64, "Width and height in pixels (even).")
_FPS = flags.DEFINE_float("fps", 8.0, "Frames per second.")
_SHOTS = flags.DEFINE_integer("shots", 2, "Shots per movie (hard cuts between them).")
_SHOT_FRAMES = flags.DEFINE_list("shot_frames", ["24", "40"], "Shot length range in frames: MIN,MAX.")
_MAX_SHAPES = flags.DEFINE_integer("max_shapes", 2, "Moving shapes per shot, at most.")
_STILLS = flags.DEFINE_list("stills", [], "Frames of every movie also saved as PNG (keyframes for generate).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

log = logging.getLogger("director_jax.movies")


def check_args(out: str | None, count: int, size: int, fps: float, shots: int, shot_frames: list[str],
               max_shapes: int, stills: list[str]) -> tuple[int, int, list[int]]:
    """Every flag checked before anything is written; returns the shot length range and the still frames."""
    if not out:
        raise UserError("--out is required: the directory to write the movies into.")
    if count < 1:
        raise UserError(f"--count {count}: give at least 1.")
    if size < 16 or size % 2:
        raise UserError(f"--size {size}: give an even size of at least 16 pixels.")
    if not np.isfinite(fps) or fps <= 0:
        raise UserError(f"--fps {fps}: give a positive number.")
    if shots < 1 or max_shapes < 1:
        raise UserError(f"--shots {shots} --max_shapes {max_shapes}: both must be at least 1.")
    try:
        lo, hi = (int(v) for v in shot_frames)
        frames = [int(v) for v in stills]
    except ValueError:
        raise UserError(f"--shot_frames {','.join(shot_frames)} / --stills {','.join(stills)}: give whole numbers "
                        "(--shot_frames MIN,MAX).") from None
    if not 1 <= lo <= hi:
        raise UserError(f"--shot_frames {lo},{hi}: give 1 <= MIN <= MAX.")
    too_late = [f for f in frames if not 0 <= f < shots * lo]
    if too_late:
        raise UserError(f"--stills {too_late}: every movie has at least {shots * lo} frames (0..{shots * lo - 1}).")
    problem = writable_dir_problem(out)  # last: it creates the directory
    if problem:
        raise UserError(f"--out {out}: {problem}")
    return lo, hi, frames


def save_png(path: Path, frame: np.ndarray) -> None:
    """A frame in [-1, 1] as an 8-bit PNG, written atomically."""
    pixels = np.clip(np.round((frame + 1.0) * 127.5), 0, 255).astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def write_movies(out: Path, *, count: int, seed: int, size: int, fps: float, shots: int, shot_frames: tuple[int, int],
                 max_shapes: int, stills: list[int], progress: bool = True) -> list[Path]:
    """The movies (and stills); a movie whose truth file records the same settings is not written again."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in tqdm(range(count), desc="movies", unit="movie", disable=not progress):
        lengths = [int(rng.integers(shot_frames[0], shot_frames[1] + 1)) for _ in range(shots)]
        path = out / f"movie_{seed + i}.mp4"
        settings = {"seed": seed + i, "shot_lengths": lengths, "size": size, "fps": fps, "max_shapes": max_shapes}
        truth = Path(truth_path(path))
        old = json.loads(truth.read_text()).get("settings") if truth.is_file() and path.is_file() else None
        if old != settings or any(not (out / f"{path.stem}_f{f}.png").is_file() for f in stills):
            info = write_synthetic_movie(path, seed + i, lengths, size, size, fps, max_shapes=max_shapes)
            for f in stills:
                save_png(out / f"{path.stem}_f{f}.png", info.movie.frames[f])
            atomic_write_text(truth, json.dumps({**info.truth(), "settings": settings}))
        paths.append(path)
    return paths


def main(argv: list[str]) -> None:
    del argv
    lo, hi, stills = check_args(_OUT.value, _COUNT.value, _SIZE.value, _FPS.value, _SHOTS.value, _SHOT_FRAMES.value,
                                _MAX_SHAPES.value, _STILLS.value)
    paths = write_movies(Path(_OUT.value), count=_COUNT.value, seed=_SEED.value, size=_SIZE.value, fps=_FPS.value,
                         shots=_SHOTS.value, shot_frames=(lo, hi), max_shapes=_MAX_SHAPES.value, stills=stills,
                         progress=_PROGRESS.value)
    print(f"{len(paths)} movies in {_OUT.value}" + (f" (stills at frames {stills})" if stills else ""))


if __name__ == "__main__":
    cli.run(main, level=logging.WARNING)
