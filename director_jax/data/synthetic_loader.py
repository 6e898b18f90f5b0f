"""A deterministic, resumable, per-host-sharded Grain pipeline of synthetic training clips.

The tiny configs and the tests train on it instead of curated shards (``director_jax.data.loader``),
with the same input contract: a checkpointable iterator whose state is plain JSON (``make_iterator``,
shared with the curated loader in ``director_jax.data.iterators``), hosts that each read their own
rows of every global batch, and batches (``b`` = this host's rows, ``T = clip_frames``)::

    video          (b, T, H, W, 3) float32 in [-1, 1]
    index          (b,) int64      the example's index
    given          (b, T) bool     only with ``tasks=True``: as the curated loader's, from
    given_start    (b, T) bool     ``task_sampling.sample_task`` on the window's true cuts, so
    task           (b,) int32      multi-shot examples put keyframes on real shot starts

With ``tasks=False`` (the default) a batch holds only ``video`` and ``index``, as it always did.

Pipeline: ``range(num_movies) -> shuffle -> repeat -> host shard -> map(synthetic_clip) -> batch``.
Example ``i`` (its task too) is a pure function of ``(cfg.seed, i)``, so it never depends on the order
it is read in, on the host count or on the worker count. Epochs revisit the same ``num_movies``
examples in a new order (Grain reseeds the shuffle each epoch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from director_jax.data.iterators import (
    HostRowsMapDataset,
    check_host_batch,
    config_from,
    make_iterator,
    mixed_shuffle_seed,
)
from director_jax.data.synthetic import random_shot, render_shot
from director_jax.data.task_sampling import DEFAULT_TASK_WEIGHTS, TaskSamplingConfig, sample_task, task_config_from

__all__ = ["SyntheticClipsConfig", "make_dataset", "make_iterator", "synthetic_clip"]


@dataclasses.dataclass(frozen=True)
class SyntheticClipsConfig:
    """The virtual dataset: ``num_movies`` procedural movies, one random clip from each."""

    num_movies: int = 10_000
    height: int = 32
    width: int = 32
    fps: float = 8.0
    clip_frames: int = 17
    shot_lengths: tuple[int, int] = (8, 32)  # min, max frames per shot (inclusive)
    shots_per_movie: int = 3
    hflip: bool = True
    seed: int = 0
    tasks: bool = False  # add given / given_start / task (the curated loader's task fields)
    # TaskSamplingConfig's fields, read only with tasks=True (see director_jax.data.task_sampling).
    task_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    max_keyframes: int = 4
    keyframe_first: float = 0.5
    keyframe_middle: float = 0.25
    keyframe_last: float = 0.5
    min_span: int = 2
    cuts_keyframed: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shot_lengths", tuple(int(n) for n in self.shot_lengths))
        lo, hi = self.shot_lengths if len(self.shot_lengths) == 2 else (0, -1)
        if not 1 <= lo <= hi:
            raise ValueError(f"shot_lengths must be (min, max) with 1 <= min <= max, got {self.shot_lengths}.")
        for name in ("num_movies", "height", "width", "clip_frames", "shots_per_movie"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds np.random.SeedSequence), got {self.seed}.")
        if self.shots_per_movie * lo < self.clip_frames:
            raise ValueError(
                f"A movie of {self.shots_per_movie} shots of >= {lo} frames can be shorter than "
                f"clip_frames={self.clip_frames}; raise shots_per_movie or shot_lengths[0].")
        object.__setattr__(self, "task_weights", self.task_config().task_weights)  # validated, all tasks named

    def __hash__(self) -> int:
        """Hashable as before the ``task_weights`` dict (a frozen config may key a cache)."""
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> SyntheticClipsConfig:
        """Reads the fields present in an ml_collections ConfigDict (or a dict); others keep defaults.

        Keys that are not fields (e.g. the demo's ``train_movies``) are ignored, so one ``data``
        block can serve several consumers; pass ``overrides`` to set fields under other names.
        """
        return config_from(cls, config, **overrides)

    def task_config(self) -> TaskSamplingConfig:
        return task_config_from(dataclasses.asdict(self))


def _example_plan(index: int, cfg: SyntheticClipsConfig) -> tuple[int, list[int], int, bool]:
    """The random choices behind example ``index``: movie seed, shot lengths, clip start, flip."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(index)]))
    lo, hi = cfg.shot_lengths
    lengths = [int(n) for n in rng.integers(lo, hi + 1, size=cfg.shots_per_movie)]
    movie_seed = int(rng.integers(0, 2**63 - 1))
    start = int(rng.integers(0, sum(lengths) - cfg.clip_frames + 1))
    flip = bool(rng.random() < 0.5)  # always drawn, so toggling hflip changes nothing else
    return movie_seed, lengths, start, flip and cfg.hflip


def _window_cuts(lengths: list[int], start: int, clip_frames: int) -> list[int]:
    """Shot starts strictly inside the window ``[start, start + clip_frames)``, in clip frames."""
    shot_starts = np.cumsum(lengths)[:-1]
    return [int(s) - start for s in shot_starts if start < s < start + clip_frames]


def synthetic_clip(index: int, cfg: SyntheticClipsConfig) -> dict[str, np.ndarray]:
    """Example ``index``: ``clip_frames`` frames of ``make_movie(movie_seed, lengths)``, maybe flipped.

    Equals slicing the full ``make_movie`` output, but only the shots the clip touches are
    rendered, each only up to the clip's last frame: the shot specs are drawn in ``make_movie``'s
    order from the same generator, so skipped shots still advance it identically. With ``cfg.tasks``
    the task is drawn from its own stream (``sample_task``), so it leaves the frames unchanged.
    """
    movie_seed, lengths, start, flip = _example_plan(index, cfg)
    stop = start + cfg.clip_frames
    rng = np.random.default_rng(movie_seed)  # as make_movie does
    pieces, shot_start = [], 0
    for n in lengths:
        if shot_start >= stop:
            break
        spec = random_shot(rng, n, cfg.height, cfg.width)
        shot_end = shot_start + n
        if shot_end > start:
            # Truncating num_frames keeps velocities (they are baked into the spec) and the
            # per-frame maths, so frames [0, stop - shot_start) are bit-identical to the full shot.
            upto = min(stop, shot_end) - shot_start
            frames = render_shot(dataclasses.replace(spec, num_frames=upto), cfg.height, cfg.width).frames
            pieces.append(frames[max(start - shot_start, 0):])
        shot_start = shot_end
    video = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    if flip:
        video = video[:, :, ::-1]
    out = {"video": np.ascontiguousarray(video, dtype=np.float32), "index": np.int64(index)}
    if cfg.tasks:
        spec = sample_task(cfg.clip_frames, _window_cuts(lengths, start, cfg.clip_frames), seed=cfg.seed,
                           index=index, cfg=cfg.task_config())
        out.update(given=spec.given, given_start=spec.given_start, task=np.int32(spec.task_id))
    return out


def make_dataset(cfg: SyntheticClipsConfig, *, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, shuffle_seed: int, num_epochs: int | None = None) -> grain.MapDataset:
    """This process's batches of ``global_batch_size // process_count`` clips (a Grain MapDataset).

    At every step the process batches, stacked in process order, equal the single-process global
    batch, so the trainer can assemble a global array from per-host pieces. ``num_epochs=None``
    repeats forever; with a finite count the last incomplete global batch is dropped.
    """
    local_batch = check_host_batch(global_batch_size=global_batch_size, process_index=process_index,
                                   process_count=process_count, shuffle_seed=shuffle_seed, num_epochs=num_epochs)
    if num_epochs is not None and cfg.num_movies * num_epochs < global_batch_size:
        raise ValueError(f"num_movies * num_epochs = {cfg.num_movies * num_epochs} is less than one "
                         f"global batch of {global_batch_size}; the dataset would be empty.")
    ds = grain.MapDataset.range(cfg.num_movies).shuffle(seed=mixed_shuffle_seed(shuffle_seed))
    ds = ds.repeat(num_epochs)
    ds = HostRowsMapDataset(ds, local_batch, process_index, process_count)
    ds = ds.map(functools.partial(synthetic_clip, cfg=cfg))
    return ds.batch(local_batch, drop_remainder=True)
