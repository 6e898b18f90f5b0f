"""Which SmartDirector mode a training example teaches, and which of its frames are given.

Every mode is a timeline with given spans (docs/design.md), so a training example needs one choice: the
task and its given spans over the clip's ``T`` frames. ``sample_task`` makes it as a pure function of
``(seed, index)`` and the clip's cuts, so an example's task never depends on read order, host count or
worker count, and a resumed run sees the same tasks again.

Tasks (``TASKS``; ``task_id`` is the position in that tuple, the ``task`` field of a batch):

* ``single_shot``: 1..``max_keyframes`` keyframes. The first, middle (``(T - 1) // 2``) and last frame
  are each given with their own probability; further keyframes sit on uniformly drawn other frames
  (never on those three), up to a uniformly drawn count.
* ``multi_shot``: a keyframe at frame 0 and at every cut (shot start) inside the clip, plus a
  uniformly drawn number of extra keyframes on other frames, ``max_keyframes`` in all. Eligible only
  when the clip holds a cut and 1 + cuts <= ``max_keyframes``. With ``cuts_keyframed`` a clip that
  holds a cut takes this task only (see below).
* ``extend_forward``: a given video span at the start (generate what follows).
* ``extend_backward``: a given video span at the end (generate what came before).
* ``in_between``: given video spans at both ends (generate the middle).

``cuts_keyframed`` (default off): every cut inside a clip is a keyframe, so a clip holding a cut
always takes ``multi_shot``. Without captions nothing tells a model where an unkeyed cut goes, and
training on such windows teaches it that shots may change anywhere between two keyframes (the CPU
demo's Gen, trained without captions, turns it on). A text-conditioned model reads the cut from the
shot-structured caption, so the default keeps every task for those windows.

Given video spans hold ``min_span``..``T - 1`` frames (in-between: both ends together leave at least
one generated frame). Tasks an example cannot take are dropped and the weights of the others are
renormalised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from director_jax.models.timeline import Timeline

TASKS = ("single_shot", "multi_shot", "extend_forward", "extend_backward", "in_between")
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
DEFAULT_TASK_WEIGHTS = {"single_shot": 0.4, "multi_shot": 0.3, "extend_forward": 0.1, "extend_backward": 0.1,
                        "in_between": 0.1}

_SALT = 0x7A5C  # keeps this module's random stream apart from others seeded with the same (seed, index)


@dataclasses.dataclass(frozen=True)
class TaskSamplingConfig:
    """Task weights and keyframe placement probabilities."""

    task_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    max_keyframes: int = 4
    keyframe_first: float = 0.5  # single-shot: probability that frame 0 is a keyframe
    keyframe_middle: float = 0.25  # ... that frame (T - 1) // 2 is
    keyframe_last: float = 0.5  # ... that frame T - 1 is
    min_span: int = 2  # frames of a given video span (extension tasks)
    cuts_keyframed: bool = False  # a clip holding a cut takes multi_shot only (a keyframe at every shot start)

    def __post_init__(self) -> None:
        weights = dict(self.task_weights)
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"task_weights has unknown tasks {unknown}; the tasks are {list(TASKS)}.")
        weights = {name: float(weights.get(name, 0.0)) for name in TASKS}
        if any(w < 0 or not np.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"task_weights must be finite, >= 0 and not all 0; got {weights}.")
        object.__setattr__(self, "task_weights", weights)
        if self.max_keyframes < 1:
            raise ValueError(f"max_keyframes must be >= 1, got {self.max_keyframes}.")
        if self.min_span < 1:
            raise ValueError(f"min_span must be >= 1, got {self.min_span}.")
        for name in ("keyframe_first", "keyframe_middle", "keyframe_last"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability; got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSpec:
    """One example's task: the given-frame mask and the given spans it comes from."""

    task: str
    num_frames: int
    spans: tuple[tuple[int, int], ...]  # (start, length), sorted; keyframes have length 1

    @property
    def task_id(self) -> int:
        return TASK_IDS[self.task]

    @property
    def given(self) -> np.ndarray:
        """(T,) bool: frames held clean."""
        mask = np.zeros(self.num_frames, bool)
        for start, length in self.spans:
            mask[start:start + length] = True
        return mask

    @property
    def given_start(self) -> np.ndarray:
        """(T,) bool: the first frame of every given span (adjacent keyframes differ from one 2-frame span)."""
        mask = np.zeros(self.num_frames, bool)
        mask[[s for s, _ in self.spans]] = True
        return mask

    @property
    def keyframes(self) -> list[int]:
        return [s for s, n in self.spans if n == 1]

    def timeline(self) -> Timeline:
        return Timeline(self.num_frames, self.spans)


def spans_from_masks(given: np.ndarray, given_start: np.ndarray) -> list[tuple[int, int]]:
    """Inverts ``TaskSpec.given`` / ``given_start`` (e.g. one row of a batch) back to (start, length) spans."""
    given, given_start = np.asarray(given, bool), np.asarray(given_start, bool)
    if given.shape != given_start.shape or given.ndim != 1:
        raise ValueError(f"given and given_start must be (T,) of one shape; got {given.shape}, {given_start.shape}.")
    if np.any(given_start & ~given):
        raise ValueError("given_start marks frames that are not given.")
    spans, start = [], None
    for t, (g, s) in enumerate(zip(given.tolist(), given_start.tolist(), strict=True)):
        if start is not None and (not g or s):
            spans.append((start, t - start))
            start = None
        if s:
            start = t
        elif g and start is None:
            raise ValueError(f"frame {t} is given but no span starts at or before it (given_start is missing one).")
    if start is not None:
        spans.append((start, len(given) - start))
    return spans


def eligible_tasks(num_frames: int, cuts: Sequence[int], cfg: TaskSamplingConfig) -> list[str]:
    """The tasks a clip of ``num_frames`` frames with these cuts can take (weights not considered)."""
    inside = [c for c in cuts if 0 < c < num_frames]
    fits = 1 + len(set(inside)) <= cfg.max_keyframes
    if inside and cfg.cuts_keyframed:
        if not fits:
            raise ValueError(f"a clip of {num_frames} frames holds {len(set(inside))} cuts, so with cuts_keyframed it "
                             f"needs {1 + len(set(inside))} keyframes, more than max_keyframes={cfg.max_keyframes}: "
                             "raise data.tasks.max_keyframes or use shorter clips.")
        return ["multi_shot"]
    out = ["single_shot"]
    if inside and fits:
        out.append("multi_shot")
    if num_frames >= cfg.min_span + 1:
        out += ["extend_forward", "extend_backward"]
    if num_frames >= 2 * cfg.min_span + 1:
        out.append("in_between")
    return out


def _rng(seed: int, index: int | Sequence[int]) -> np.random.Generator:
    key = [int(index)] if np.isscalar(index) else [int(i) for i in index]
    if seed < 0 or any(k < 0 for k in key):
        raise ValueError(f"seed and index must be >= 0 (they seed np.random.SeedSequence); got {seed}, {index}.")
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT, *key]))


def _single_shot(rng: np.random.Generator, t: int, cfg: TaskSamplingConfig) -> list[int]:
    k = min(cfg.max_keyframes, t)
    count = int(rng.integers(1, k + 1))
    draws = rng.random(3)  # always drawn: first, last, middle (priority order when max_keyframes < 3)
    anchors = [f for f, d, p in zip((0, t - 1, (t - 1) // 2), draws,
                                    (cfg.keyframe_first, cfg.keyframe_last, cfg.keyframe_middle), strict=True) if d < p]
    anchors = list(dict.fromkeys(anchors))[:k]
    others = np.setdiff1d(np.arange(t), [0, t - 1, (t - 1) // 2])
    extra = min(max(count - len(anchors), 0), len(others))
    keys = anchors + [int(f) for f in rng.choice(others, size=extra, replace=False)] if extra else anchors
    if not keys:  # a clip of <= 3 frames with no anchor drawn: one of them
        keys = [int(rng.choice(sorted({0, t - 1, (t - 1) // 2})))]
    return keys


def _multi_shot(rng: np.random.Generator, t: int, cuts: list[int], cfg: TaskSamplingConfig) -> list[int]:
    keys = sorted({0, *cuts})
    others = np.setdiff1d(np.arange(t), keys)
    extra = int(rng.integers(0, min(cfg.max_keyframes - len(keys), len(others)) + 1))
    return keys + [int(f) for f in rng.choice(others, size=extra, replace=False)]


def sample_task(num_frames: int, cuts: Sequence[int], *, seed: int, index: int | Sequence[int],
                cfg: TaskSamplingConfig | None = None) -> TaskSpec:
    """The task and given spans of example ``index`` (an int or a tuple such as ``(epoch, record)``).

    ``cuts`` are shot starts in the clip's own frames (those outside ``(0, num_frames)`` are
    ignored). Deterministic in ``(seed, index, num_frames, cuts, cfg)``.
    """
    cfg = cfg or TaskSamplingConfig()
    t = int(num_frames)
    if t < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    rng = _rng(seed, index)
    inside = sorted({int(c) for c in cuts if 0 < c < t})
    names = eligible_tasks(t, inside, cfg)
    weights = np.array([cfg.task_weights[n] for n in names])
    if weights.sum() <= 0:
        raise ValueError(f"a clip of {t} frames with cuts {inside} can only take tasks {names}, all of weight 0 in "
                         f"{cfg.task_weights}: give one of them a weight, or use longer clips.")
    cdf = np.cumsum(weights) / weights.sum()
    task = names[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(names) - 1)]
    lo = cfg.min_span
    if task == "single_shot":
        spans = [(f, 1) for f in _single_shot(rng, t, cfg)]
    elif task == "multi_shot":
        spans = [(f, 1) for f in _multi_shot(rng, t, inside, cfg)]
    elif task == "extend_forward":
        spans = [(0, int(rng.integers(lo, t)))]
    elif task == "extend_backward":
        n = int(rng.integers(lo, t))
        spans = [(t - n, n)]
    else:  # in_between
        head = int(rng.integers(lo, t - lo))
        tail = int(rng.integers(lo, t - head))
        spans = [(0, head), (t - tail, tail)]
    spec = TaskSpec(task, t, tuple(sorted(spans)))
    spec.timeline()  # validates (raises on overlap or out of range)
    return spec


def task_config_from(items: Mapping[str, Any]) -> TaskSamplingConfig:
    """The TaskSamplingConfig fields present in a mapping (e.g. a loader config's fields)."""
    names = {f.name for f in dataclasses.fields(TaskSamplingConfig)}
    return TaskSamplingConfig(**{k: v for k, v in items.items() if k in names})
