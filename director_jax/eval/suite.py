"""Evaluation cases: a timeline (keyframes at times), a caption and the true clip to compare with.

The synthetic suite builds its cases from held-out synthetic movies (``data/synthetic.py``) made
with fixed seeds: case templates (where the clip starts, how long it is, the keyframe times) are
applied to each of ``movies.count`` movies with seeds ``movies.first_seed + i``. Training draws
movie seeds at random from [0, 2^63) (``data/synthetic_loader.py``), so a held-out seed in the low
millions coincides with a training movie with probability ~1e-12. Everything here is NumPy and a
pure function of the config: every process and every run builds the same cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from director_jax.data.captions import format_multishot_caption
from director_jax.data.synthetic import ShotSpec, random_shot, render_shot, shot_caption
from director_jax.eval.trajectory import ObjectTruth
from director_jax.models.timeline import frame_at_time

ANCHORS = ("movie", "cut")


@dataclasses.dataclass(frozen=True, eq=False)
class EvalCase:
    """One timeline to generate and the ground truth it is scored against.

    Synthetic cases know their objects' trajectories (``truth``) and come from a movie seed; curated
    cases (``eval/curated.py``) come from a clip of real footage (``clip_id``) and have no ``truth``.
    """

    index: int  # position in the suite; also what the case's generation seed is folded with
    name: str
    template: str
    movie_seed: int | None
    start: int  # first movie (or curated clip) frame of the case, at the model's fps
    fps: float
    keyframes: tuple[int, ...]  # frame indices within the clip
    caption: str
    reference: np.ndarray  # (T, H, W, 3) float32 in [-1, 1]: the true clip
    cuts: tuple[int, ...]  # clip frames that start a new shot
    truth: ObjectTruth | None
    clip_id: str = ""  # the curated sample's id (curated suite)

    @property
    def num_frames(self) -> int:
        return int(self.reference.shape[0])

    @property
    def layout_key(self) -> tuple[int, tuple[int, ...]]:
        """Cases with one key share a timeline layout, so they can be generated in one batch."""
        return self.num_frames, self.keyframes

    def describe(self) -> dict:
        """The case as JSON-able fields (no arrays): what a saved case list holds and metrics.json repeats."""
        source = {"movie_seed": self.movie_seed} if self.movie_seed is not None else {"clip_id": self.clip_id}
        return {"index": self.index, "name": self.name, "template": self.template, **source,
                "start": self.start, "frames": self.num_frames, "fps": self.fps, "keyframes": list(self.keyframes),
                "cuts": list(self.cuts), "caption": self.caption}


@dataclasses.dataclass
class _Movie:
    frames: np.ndarray
    specs: list[ShotSpec]
    centers: list[np.ndarray]
    shot_starts: list[int]


def synthetic_movie(seed: int, shot_lengths: Sequence[int], height: int, width: int, max_shapes: int) -> _Movie:
    """``data.synthetic.make_movie``'s movie (same rng order, same frames) with the shot specs kept."""
    rng = np.random.default_rng(seed)
    specs = [random_shot(rng, int(n), height, width, max_shapes) for n in shot_lengths]
    shots = [render_shot(s, height, width) for s in specs]
    starts = np.concatenate([[0], np.cumsum(shot_lengths)[:-1]]).astype(int).tolist()
    return _Movie(np.concatenate([s.frames for s in shots]), specs, [s.centers for s in shots], starts)


def _clip_case(index: int, template: dict, movie: _Movie, movie_seed: int, fps: float, default_frames: int,
               height: int, width: int) -> EvalCase:
    name = str(template["name"])
    frames = int(template.get("frames", default_frames))
    anchor = str(template.get("anchor", "movie"))
    if anchor not in ANCHORS:
        raise ValueError(f"case {name!r}: anchor={anchor!r}; choose one of {ANCHORS} (clip start counted from the "
                         "movie's first frame or from its first cut).")
    if anchor == "cut" and len(movie.shot_starts) < 2:
        raise ValueError(f"case {name!r} is anchored at a cut but the movies have one shot: give movies.shot_lengths "
                         "two or more shots.")
    start = int(template.get("start", 0)) + (movie.shot_starts[1] if anchor == "cut" else 0)
    total = len(movie.frames)
    if start < 0 or start + frames > total:
        raise ValueError(f"case {name!r}: clip frames {start}..{start + frames - 1} lie outside the movie's {total} "
                         "frames; change the case's start / frames or movies.shot_lengths.")
    keyframes = tuple(sorted(frame_at_time(k, fps, frames) for k in template["keyframes"]))
    if len(set(keyframes)) != len(keyframes):
        raise ValueError(f"case {name!r}: keyframe times {list(template['keyframes'])} land on the same frame twice "
                         f"at {fps:g} fps ({list(keyframes)}).")
    shot_of = [int(np.searchsorted(movie.shot_starts, f, side="right") - 1) for f in range(start, start + frames)]
    in_shot = [f - movie.shot_starts[s] for f, s in zip(range(start, start + frames), shot_of, strict=True)]
    shots = sorted(set(shot_of))
    caption = format_multishot_caption([shot_caption(movie.specs[s], height, width) for s in shots])
    cuts = tuple(i for i in range(1, frames) if shot_of[i] != shot_of[i - 1])
    truth = ObjectTruth.from_shots(movie.specs, movie.centers, shot_of, in_shot)
    return EvalCase(index=index, name=f"{name} / movie {movie_seed}", template=name, movie_seed=movie_seed,
                    start=start, fps=fps, keyframes=keyframes, caption=caption,
                    reference=np.ascontiguousarray(movie.frames[start:start + frames]), cuts=cuts, truth=truth)


def synthetic_cases(cfg: ml_collections.ConfigDict, *, height: int, width: int, fps: float,
                    num_frames: int) -> list[EvalCase]:
    """Every template of ``cfg.cases`` on every held-out movie of ``cfg.movies``; indices in that order.

    ``height`` / ``width`` / ``fps`` / ``num_frames`` (the default clip length) come from the model's
    config, so the clips have the size the model was trained on.
    """
    m = cfg.movies
    templates = [dict(t) for t in cfg.cases]
    if not templates:
        raise ValueError("the eval config lists no cases: add templates to config.cases.")
    for t in templates:
        missing = {"name", "keyframes"} - set(t)
        if missing:
            raise ValueError(f"case template {t} lacks {sorted(missing)}; each needs a name and keyframe times.")
    cases = []
    for i in range(int(m.count)):
        seed = int(m.first_seed) + i
        movie = synthetic_movie(seed, tuple(m.shot_lengths), height, width, int(m.max_shapes))
        for t in templates:
            cases.append(_clip_case(len(cases), t, movie, seed, fps, num_frames, height, width))
    return cases
