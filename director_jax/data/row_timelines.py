"""Per-example timelines in a static-shape step: each row's chunks, latents and masks as plain arrays.

SmartDirector learns pacing from many timelines: keyframes anywhere, one to many, at shot starts, and
the extension tasks. Every row of a global batch therefore has its own layout (``TimelineLayout``),
with its own chunk count, chunk lengths and latent count L. A jitted step needs static shapes, so
this module turns the rows' frame-level ``given`` / ``given_start`` masks (the loaders' task draw)
into fixed-size arrays, on the host, before the step:

* **Latent buckets**: a batch's rows are padded to one latent length, the smallest of the
  configured ``buckets`` that holds its longest row. ``valid`` (B, L_b) marks each row's real latent
  frames (a prefix: padding sits at the end, so the DiT masks padded tokens as attention keys with
  one valid count per row and drops them from the loss). Each bucket compiles once.
* **Chunk slots** (the frozen VAE encoding pixels inside the step): a row's chunks are sorted by
  length, longest first, and chunk ``i`` goes to slot ``i``. The i-th longest of chunks that share
  T frames has at most ``T // i`` frames, so slot ``i`` holds ``padded_length(T // i)`` frames: the
  whole encode costs about ``T * H(C)`` frames for C slots (harmonic number; 2.3x T for 5 slots),
  not ``C * T``. ``slot_frames_i`` (B, P_i) are the clip frames each slot encodes (a chunk's last
  frame repeated to the slot's length, as ``pad_to_length`` pads a chunk), and ``latent_source``
  (B, L_b) picks every row latent out of the slots' concatenated latents. Since the VAE is causal,
  a chunk's latents do not depend on the repeated frames after it.

Everything is numpy and pure in the masks, so every host computes its own rows alike.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from director_jax.data.task_sampling import spans_from_masks
from director_jax.models.timeline import TEMPORAL_FACTOR, Timeline, TimelineLayout, latent_count, padded_length


def max_chunks(max_keyframes: int) -> int:
    """Most chunks a drawn task can make: single-shot keyframes plus the chunk before the first (>= 3 for
    in-between: head span, its tail cut, end span)."""
    return max(int(max_keyframes) + 1, 3)


@functools.lru_cache(maxsize=64)
def max_latents(num_frames: int, chunks: int) -> int:
    """The largest latent count of a timeline of ``num_frames`` frames cut into at most ``chunks`` chunks."""
    t = int(num_frames)
    best = [[-1] * (t + 1) for _ in range(chunks + 1)]  # best[c][n]: c chunks covering the first n frames
    best[0][0] = 0
    for c in range(1, chunks + 1):
        for n in range(1, t + 1):
            best[c][n] = max((best[c - 1][m] + latent_count(n - m) for m in range(n) if best[c - 1][m] >= 0),
                             default=-1)
    return max(best[c][t] for c in range(1, chunks + 1))


@dataclasses.dataclass(frozen=True)
class RowTimelineShapes:
    """The static shapes of per-example timelines: clip length, chunk slots and latent buckets."""

    num_frames: int
    slots: int
    buckets: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.slots < 1:
            raise ValueError(f"num_frames and slots must be >= 1; got {self.num_frames}, {self.slots}.")
        longest = max_latents(self.num_frames, self.slots)
        buckets = tuple(sorted({int(b) for b in self.buckets})) or (longest,)
        if buckets[0] < 1:
            raise ValueError(f"latent buckets must be positive; got {self.buckets}.")
        if buckets[-1] < longest:
            raise ValueError(f"train.latent_buckets={buckets}: a timeline of {self.num_frames} frames in up to "
                             f"{self.slots} chunks has up to {longest} latent frames; add a bucket of {longest}.")
        object.__setattr__(self, "buckets", buckets)

    @property
    def slot_frames(self) -> tuple[int, ...]:
        """Frames each slot encodes: the i-th longest chunk has at most T // i frames."""
        return tuple(padded_length(max(self.num_frames // i, 1)) for i in range(1, self.slots + 1))

    @property
    def slot_latents(self) -> tuple[int, ...]:
        return tuple((p - 1) // TEMPORAL_FACTOR + 1 for p in self.slot_frames)

    @property
    def slot_offsets(self) -> tuple[int, ...]:
        """Where each slot's latents start in the slots' concatenation."""
        return tuple(int(x) for x in np.cumsum((0, *self.slot_latents))[:-1])

    def bucket_for(self, latents: int) -> int:
        """The smallest bucket holding ``latents`` latent frames."""
        for b in self.buckets:
            if b >= latents:
                return b
        raise ValueError(f"a row has {latents} latent frames, more than the largest bucket {self.buckets[-1]}.")


def row_layout(given: np.ndarray, given_start: np.ndarray) -> TimelineLayout:
    """One row's layout from its frame masks (``TaskSpec.given`` / ``given_start``)."""
    return Timeline(len(given), tuple(spans_from_masks(given, given_start))).layout


def slot_plan(layout: TimelineLayout, shapes: RowTimelineShapes) -> tuple[list[np.ndarray], np.ndarray]:
    """(frames each slot encodes, the slot-latent index of each of the row's latents) for one row."""
    chunks = sorted(layout.chunks, key=lambda c: (-c.length, c.start))
    if len(chunks) > shapes.slots:
        raise ValueError(f"a timeline with {len(chunks)} chunks (spans {layout.timeline.spans}) exceeds the "
                         f"{shapes.slots} chunk slots; raise train.max_chunks.")
    frames = [np.zeros(p, np.int32) for p in shapes.slot_frames]
    source = np.zeros(layout.num_latents, np.int32)
    for slot, chunk in enumerate(chunks):
        p = shapes.slot_frames[slot]
        if chunk.padded_length > p:  # cannot happen (the harmonic bound); a clear failure if it ever does
            raise AssertionError(f"chunk of {chunk.length} frames in slot {slot} of {p} frames")
        frames[slot] = (chunk.start + np.minimum(np.arange(p), chunk.length - 1)).astype(np.int32)
        first = shapes.slot_offsets[slot]
        source[chunk.latent_offset:chunk.latent_offset + chunk.num_latents] = first + np.arange(chunk.num_latents)
    return frames, source


def plan_rows(given: np.ndarray, given_start: np.ndarray, shapes: RowTimelineShapes, *, slots: bool = True,
              keyframes_kept: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-row timeline arrays of a batch, padded to the largest bucket (``crop_to_bucket`` picks one).

    ``given`` / ``given_start`` (b, T) bool. ``keyframes_kept`` (b,) bool: rows whose given latents stay
    clean (False: keyframe dropout, every latent generated). Returns ``latent_given``,
    ``latent_valid`` (b, L_max) bool, ``latent_position`` (b, L_max) float32 (MC-RoPE, 0 past the row),
    ``latent_count`` (b,) int32 and, with ``slots``, ``latent_source`` (b, L_max) int32 and
    ``slot_frames_{i}`` (b, P_i) int32.
    """
    given, given_start = np.asarray(given, bool), np.asarray(given_start, bool)
    b, t = given.shape
    if t != shapes.num_frames:
        raise ValueError(f"rows of {t} frames; the per-example timelines are set up for {shapes.num_frames}.")
    size = shapes.buckets[-1]
    out = {"latent_given": np.zeros((b, size), bool), "latent_valid": np.zeros((b, size), bool),
           "latent_position": np.zeros((b, size), np.float32), "latent_count": np.zeros(b, np.int32)}
    if slots:
        out["latent_source"] = np.zeros((b, size), np.int32)
        for i, p in enumerate(shapes.slot_frames):
            out[f"slot_frames_{i}"] = np.zeros((b, p), np.int32)
    kept = np.ones(b, bool) if keyframes_kept is None else np.asarray(keyframes_kept, bool)
    for row in range(b):
        layout = row_layout(given[row], given_start[row])
        n = layout.num_latents
        if n > size:
            raise ValueError(f"a timeline of {n} latent frames (spans {layout.timeline.spans}) exceeds the largest "
                             f"bucket {size}; add a larger one to train.latent_buckets.")
        out["latent_given"][row, :n] = layout.given & kept[row]
        out["latent_valid"][row, :n] = True
        out["latent_position"][row, :n] = layout.position
        out["latent_count"][row] = n
        if slots:
            frames, source = slot_plan(layout, shapes)
            out["latent_source"][row, :n] = source
            for i, f in enumerate(frames):
                out[f"slot_frames_{i}"][row] = f
    return out


LATENT_AXIS_FIELDS = ("latent_given", "latent_valid", "latent_position", "latent_source", "latents", "lowres_latents")


def crop_to_bucket(batch: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
    """``batch`` with every per-latent array cut to ``bucket`` latent frames (rows hold at most that many)."""
    longest = int(np.max(batch.get("latent_count", 0), initial=0))
    if longest > bucket:
        raise ValueError(f"a row has {longest} latent frames, more than the bucket {bucket}.")
    return {k: (v[:, :bucket] if k in LATENT_AXIS_FIELDS else v) for k, v in batch.items()}


def padding_fraction(latent_count: Sequence[int] | np.ndarray, bucket: int) -> float:
    """Share of a batch's latent frames that are padding."""
    counts = np.asarray(latent_count, np.float64)
    return float(1.0 - counts.sum() / (bucket * max(len(counts), 1)))
