"""The curated suite: evaluation cases drawn with a fixed seed from held-out clips of real footage.

``evaluate --suite curated --data DIR`` reads the TFDS build of a curated directory (what
``python -m director_jax.shards --curated DIR`` writes: the curated dir, its ``tfds/`` or the version
dir) and turns clips of one split (``validation`` by default, ``train`` or ``all``) into cases: a
window of the model's clip length at the model's fps (frames resampled to the nearest in time and
resized to cover the model's size, then centre-cropped, exactly as the training loader does), the
true window as the reference, keyframes taken from it:

* a clip with a cut that a window can hold: the window is drawn among those holding a cut, each of
  its cuts 3 frames or more from both ends where the clip allows (else 1), and the keyframes are
  the **shot starts** (frame 0 and every cut in the window): template
  ``multi-shot: keyframes at shot starts``;
* otherwise ``k`` keyframes (``min_keyframes..max_keyframes``, drawn) at distinct drawn frames:
  template ``single shot: k keyframe(s)``.

The caption is that of the shots the window shows (``data.captions.shot_range_caption``).

Which clips: the split's records sorted by id, those long enough at the model's fps, the first
``max_clips``; each shorter one is a counted skip (``skipped`` in metrics.json), never a silent
drop. Each clip draws from its own generator, seeded by ``sha256(f"{seed}:{clip id}")``, so a clip's
case does not depend on which other clips the data holds, and a rerun builds the same cases.

Case lists: every run writes ``cases.json`` (each case's clip id, window start, length, keyframes,
template, and the model's size and fps); ``--config.cases_file=cases.json`` rebuilds exactly those
cases from the data (any split), so two checkpoints are compared on the same footage and
keyframes even after clips were added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from director_jax.data.captions import shot_range_caption
from director_jax.data.loader import decode_frames, resampled_length, source_frame_indices, window_shots
from director_jax.data.shards import Shards, dataset_dir, index_file
from director_jax.eval.suite import EvalCase

SPLITS = ("validation", "train", "all")
CASE_LIST_FORMAT = 1
MULTI_SHOT = "multi-shot: keyframes at shot starts"
MIN_SHOT_FRAMES = 3  # frames a drawn window shows of each side of its cut, where the clip allows


@dataclasses.dataclass(frozen=True)
class _Clip:
    """A record of the dataset, located without reading its clip bytes."""

    shards: Shards
    row: int
    id: str
    length: int  # frames at the model's fps

    def record(self) -> dict:
        return self.shards.record(self.row)


@dataclasses.dataclass(frozen=True)
class VideoShape:
    """The model's clip: what cases are cut and resized to."""

    height: int
    width: int
    fps: float
    frames: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def open_splits(data: str, split: str) -> list[Shards]:
    """The dataset's ``split`` (``all``: every split it has) as ``Shards``; ValueError naming what is wrong."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {SPLITS}.")
    path = dataset_dir(data)  # FileNotFoundError with the build command when there is no build
    names = [s for s in ("train", "validation") if (path / index_file(s)).is_file()] if split == "all" else [split]
    if not names:
        raise ValueError(f"{path} has no split index (index-<split>.npz): rebuild it with python -m "
                         "director_jax.shards.")
    return [Shards(path, name) for name in names]


def _clips(splits: Sequence[Shards], fps: float) -> list[_Clip]:
    clips = []
    for shards in splits:
        idx = shards.index
        lengths = resampled_length(idx["num_frames"], idx["fps"], fps)
        clips += [_Clip(shards, i, str(idx["id"][i]), int(lengths[i])) for i in range(len(shards))]
    return sorted(clips, key=lambda c: c.id)


def _rng(seed: int, clip_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()
    return np.random.default_rng(np.frombuffer(digest, np.uint32))


def _shot_of_frames(record: dict, start: int, frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """The window's source frames and the clip's shot of each (0-based; cuts are the record's shot starts)."""
    src = source_frame_indices(start, frames, float(record["fps"]), fps)
    cuts = np.asarray(record["cuts"], np.int64)
    return src, np.searchsorted(cuts, src, side="right")


def draw_window(rng: np.random.Generator, record: dict, length: int, shape: VideoShape, min_keyframes: int,
                max_keyframes: int) -> tuple[int, tuple[int, ...], str]:
    """(window start, keyframes within the window, template) of one clip (module doc)."""
    frames = shape.frames
    _, shot_all = _shot_of_frames(record, 0, length, shape.fps)
    cut_positions = [j for j in range(1, length) if shot_all[j] != shot_all[j - 1]]
    # windows holding a cut with every cut in it `side` frames or more from both ends: 3 where the clip allows (a
    # shot of 1 or 2 frames at a window's edge is no test of a cut, and no detector reports one), else 1
    cuts = np.asarray(cut_positions, np.int64)
    for side in (MIN_SHOT_FRAMES, 1):
        starts = [s for s in range(length - frames + 1)
                  if np.any((cuts > s) & (cuts < s + frames))
                  and not np.any(((cuts > s) & (cuts < s + side)) | ((cuts > s + frames - side) & (cuts < s + frames)))]
        if starts:
            break
    if starts:
        start = int(starts[int(rng.integers(len(starts)))])
        shots = shot_all[start:start + frames]
        keyframes = (0, *(j for j in range(1, frames) if shots[j] != shots[j - 1]))
        return start, tuple(keyframes), MULTI_SHOT
    start = int(rng.integers(0, length - frames + 1))
    k = int(rng.integers(min_keyframes, min(max_keyframes, frames) + 1))
    keyframes = tuple(sorted(int(f) for f in rng.choice(frames, size=k, replace=False)))
    return start, keyframes, f"single shot: {k} keyframe{'s' if k > 1 else ''}"


def _case(index: int, clip: _Clip, record: dict, start: int, keyframes: tuple[int, ...], template: str,
          shape: VideoShape) -> EvalCase:
    src, shot = _shot_of_frames(record, start, shape.frames, shape.fps)
    pixels = decode_frames(bytes(record["clip"]), src, shape.height, shape.width)
    reference = pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    cuts = tuple(j for j in range(1, shape.frames) if shot[j] != shot[j - 1])
    caption = _text(record["caption"])
    first, counts = window_shots(src, np.asarray(record["cuts"], np.int64))
    with contextlib.suppress(ValueError):  # a caption that does not list its shots: the whole clip's caption
        caption = shot_range_caption(caption, first, first + len(counts) - 1, num_shots=len(record["cuts"]) + 1)
    return EvalCase(index=index, name=f"{template} / clip {clip.id}", template=template, movie_seed=None,
                    start=start, fps=shape.fps, keyframes=keyframes, caption=caption, reference=reference,
                    cuts=cuts, truth=None, clip_id=clip.id)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _settings(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    lo, hi, count = int(cfg.min_keyframes), int(cfg.max_keyframes), int(cfg.max_clips)
    if not 1 <= lo <= hi:
        raise ValueError(f"min_keyframes={lo}, max_keyframes={hi}: need 1 <= min_keyframes <= max_keyframes.")
    if count < 1:
        raise ValueError(f"max_clips={count}: evaluate at least one clip.")
    return lo, hi, count


def suite_shape(cfg: ml_collections.ConfigDict, *, height: int, width: int, fps: float, num_frames: int
                ) -> VideoShape:
    """The cases' clip: the model's size and fps; ``cfg.frames`` frames (0: the model's clip length)."""
    frames = int(cfg.get("frames", 0)) or int(num_frames)
    if frames < 2:
        raise ValueError(f"frames={frames}: a case needs at least 2 frames.")
    return VideoShape(int(height), int(width), float(fps), frames)


def eligible_clips(cfg: ml_collections.ConfigDict, shape: VideoShape) -> tuple[list[_Clip], list[dict]]:
    """The clips the suite uses (the first ``max_clips`` by id that hold a case) and those skipped as too short,
    from the dataset's index alone (no clip is read)."""
    _, _, count = _settings(cfg)
    clips = _clips(open_splits(str(cfg.data), str(cfg.split)), shape.fps)
    if not clips:
        raise ValueError(f"the {cfg.split!r} split of {cfg.data} holds no clips: choose another --config.split "
                         "(validation / train / all) or curate more footage.")
    used: list[_Clip] = []
    skipped: list[dict] = []
    for clip in clips:
        if len(used) == count:
            break
        if clip.length < shape.frames:
            skipped.append({"clip_id": clip.id, "reason": f"{clip.length} frames at {shape.fps:g} fps, the suite "
                            f"needs {shape.frames}"})
        else:
            used.append(clip)
    if not used:
        raise ValueError(f"none of the {len(clips)} clips of {cfg.data} ({cfg.split}) holds {shape.frames} frames "
                         f"at {shape.fps:g} fps: evaluate shorter cases (--config.frames) or longer clips.")
    return used, skipped


def curated_cases(cfg: ml_collections.ConfigDict, shape: VideoShape) -> tuple[list[EvalCase], list[dict]]:
    """The suite's cases and the clips skipped (each ``{"clip_id", "reason"}``), from ``cfg.data`` / ``cfg.split``
    or, when ``cfg.cases_file`` is set, that saved case list."""
    if cfg.get("cases_file"):
        return cases_from_list(cfg.cases_file, cfg.data, shape), []
    lo, hi, _ = _settings(cfg)
    clips, skipped = eligible_clips(cfg, shape)
    cases = []
    for clip in clips:
        record = clip.record()
        start, keyframes, template = draw_window(_rng(int(cfg.seed), clip.id), record, clip.length, shape, lo, hi)
        cases.append(_case(len(cases), clip, record, start, keyframes, template, shape))
    return cases, skipped


def case_list(cases: Sequence[EvalCase], shape: VideoShape, data: str, split: str, seed: int) -> dict:
    """What ``cases.json`` holds: enough to rebuild every case from the data (no pixels)."""
    return {"format": CASE_LIST_FORMAT, "suite": "curated", "seed": int(seed), "split": split, "data": str(data),
            "video": shape.as_dict(),
            "cases": [{"index": c.index, "clip_id": c.clip_id, "start": c.start, "keyframes": list(c.keyframes),
                       "template": c.template} for c in cases]}


def _read_case_list(path: str | Path) -> dict:
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"cases_file {path} does not exist (every curated run writes WORKDIR/cases.json).") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cases_file {path} is not a case list: {e}") from None
    if not isinstance(saved, dict) or saved.get("format") != CASE_LIST_FORMAT or not saved.get("cases"):
        raise ValueError(f"cases_file {path} is not a case list of format {CASE_LIST_FORMAT} with cases (a "
                         "curated run's WORKDIR/cases.json).")
    return saved


def resolve_case_list(path: str | Path, data: str, shape: VideoShape
                      ) -> list[tuple[_Clip, int, tuple[int, ...], str]]:
    """Each saved case's (clip, start, keyframes, template), checked against ``data`` from its index alone; every
    mismatch named in one line (``ValueError``)."""
    saved = _read_case_list(path)
    if saved.get("video") != shape.as_dict():
        raise ValueError(f"cases_file {path} was made for clips {saved.get('video')}, this model makes "
                         f"{shape.as_dict()}: a case list compares checkpoints of one video size, fps and length.")
    clips = {c.id: c for c in _clips(open_splits(str(data), "all"), shape.fps)}
    out = []
    for i, entry in enumerate(saved["cases"]):
        clip = clips.get(str(entry.get("clip_id")))
        if clip is None:
            raise ValueError(f"case {i} of {path} uses clip {entry.get('clip_id')!r}, which {data} does not hold: "
                             "give the data the case list was made from.")
        try:
            start, keyframes = int(entry["start"]), tuple(sorted(int(k) for k in entry["keyframes"]))
            template = str(entry["template"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"case {i} of {path} lacks a start, keyframes or template: {entry}") from None
        if start < 0 or start + shape.frames > clip.length or not keyframes \
                or not all(0 <= k < shape.frames for k in keyframes) or len(set(keyframes)) != len(keyframes):
            raise ValueError(f"case {i} of {path} (clip {clip.id}): window {start}+{shape.frames} or keyframes "
                             f"{list(keyframes)} do not fit the clip's {clip.length} frames; the data changed.")
        out.append((clip, start, keyframes, template))
    return out


def cases_from_list(path: str | Path, data: str, shape: VideoShape) -> list[EvalCase]:
    """The cases of a saved ``cases.json``, rebuilt from ``data`` (any split)."""
    return [_case(i, clip, clip.record(), start, keyframes, template, shape)
            for i, (clip, start, keyframes, template) in enumerate(resolve_case_list(path, data, shape))]
