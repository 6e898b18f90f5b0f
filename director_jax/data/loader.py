"""The Grain pipeline of curated clips: decode, resample, crop, choose a task, batch by aspect ratio.

It reads the TFDS ArrayRecord shards (``director_jax.data.shards``) that ``python -m director_jax.shards``
builds from a curated directory and gives the trainer the same contract as the synthetic loader
(``director_jax.data.synthetic_loader``; the shared part is ``director_jax.data.iterators``): each host
gets its own contiguous rows of every global batch, the iterator state is plain JSON
(``make_iterator``), and everything is deterministic in the seeds, whatever the worker count.

**Batch plan** (no decoding needed): each record goes to the aspect-ratio bucket ``(H, W)`` nearest
its clip's ``height / width`` (in log ratio, ties to the earlier bucket), read from the dataset's
index file. Records too short for ``clip_frames`` frames at the target fps are left out. Epoch ``e``
shuffles each bucket's records (seed hashed from ``shuffle_seed`` and ``e``), cuts them into global
batches (a bucket's remainder waits for the next epoch's shuffle) and shuffles the batch order: every
global batch holds one bucket, so one shape.

**An example** is a pure function of ``(cfg.seed, epoch, record)``:

1. decode the clip's mp4 bytes with PyAV from memory, only up to the last frame needed;
2. resample to ``cfg.fps`` by nearest-frame index mapping: output frame ``j`` of the resampled clip
   shows source frame ``floor(j * fps_source / fps_target + 1/2)`` (``fps=None`` keeps every frame);
3. a window of ``clip_frames`` resampled frames at a uniformly drawn start;
4. resize (swscale bicubic, keeping the aspect ratio) to cover the bucket, then center crop;
5. a task and its given frames (``director_jax.data.task_sampling``) from the window's cuts;
6. the window's caption: the caption of the shots it shows (``window_shots``: every shot from the one
   of its first frame to the one of its last), re-numbered from Shot 1
   (``captions.shot_range_caption``; all of the sample's shots: its caption as it is), with that
   caption's embedding (the shards hold one per shot range);
7. caption dropout: with probability ``caption_dropout`` the caption becomes ``""``.

A batch (``b`` = this host's rows, ``T = clip_frames``)::

    video          (b, T, H, W, 3) float32 in [-1, 1] (``video_dtype="uint8"``: uint8 in [0, 255], x / 127.5 - 1
                                   on the device; the float pass costs about as much as decoding at 480p and
                                   4x the bytes to move between processes and to the device)
    given          (b, T) bool     frames held clean (keyframes and given video spans)
    given_start    (b, T) bool     the first frame of every given span (two adjacent keyframes are two spans,
                                   not one 2-frame span); task_sampling.spans_from_masks inverts the pair
    task           (b,) int32      index into task_sampling.TASKS
    index          (b,) int64      the record's index in the split
    frame_index    (b, T) int32    the clip frame each output frame shows
    caption        (b,) str        the window's caption after dropout
    caption_dropped (b,) bool
    shot_frames    (b, T) int32    the window's frames in each shot it shows, in order, then zeros (T frames show at
                                   most T shots, so T entries always suffice); sums to T; the last shot's entry is
                                   >= 1, so the shot count is the position of the last non-zero entry + 1
    text           (b, L, D) float32, text_mask (b, L) bool   only when the shards hold text embeddings

``text`` is the window caption's cached umT5 embedding zero-padded to ``L`` (``cfg.text_length``, default the
cache's ``max_length``). A dropped caption gets the empty caption's embedding when the cache held it
at build time, else zeros with an all-False mask (the cross-attention then sees no text).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from director_jax.data.captions import shot_range_caption
from director_jax.data.iterators import (
    HostRowsMapDataset,
    check_host_batch,
    config_from,
    make_iterator,
    mixed_shuffle_seed,
)
from director_jax.data.shards import Shards, range_embedding
from director_jax.data.task_sampling import DEFAULT_TASK_WEIGHTS, TaskSamplingConfig, sample_task, task_config_from

log = logging.getLogger(__name__)

__all__ = ["CuratedLoaderConfig", "ExampleMaker", "curated_loader_config", "make_curated_dataset", "make_iterator",
           "batch_plan", "nearest_bucket", "resampled_length", "source_frame_indices", "text_metadata", "window_shots"]

VIDEO_DTYPES = ("float32", "uint8")
_EPS = 1e-9  # keeps j * ratio + 1/2 that is a whole number in exact arithmetic from rounding down


@dataclasses.dataclass(frozen=True)
class CuratedLoaderConfig:
    """What the trainer's examples are cut from and how."""

    data_dir: str = ""  # a curated dir (with tfds/ inside), its tfds/ data dir, or the dataset version dir
    split: str = "train"
    clip_frames: int = 81
    fps: float | None = None  # resample target; None keeps the clips' own rate
    buckets: tuple[tuple[int, int], ...] = ((480, 832),)  # (height, width) aspect-ratio buckets
    task_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    max_keyframes: int = 4
    keyframe_first: float = 0.5
    keyframe_middle: float = 0.25
    keyframe_last: float = 0.5
    min_span: int = 2
    cuts_keyframed: bool = False
    caption_dropout: float = 0.1
    text_length: int | None = None  # pad text embeddings to this many tokens (default: the cache's max_length)
    decode_threads: int = 1  # FFmpeg threads per decode (0: FFmpeg chooses); parallelism comes from workers
    video_dtype: str = "float32"  # "float32": [-1, 1]; "uint8": raw [0, 255], 4x less to move (scale on device)
    seed: int = 0

    def __post_init__(self) -> None:
        buckets = tuple((int(h), int(w)) for h, w in self.buckets)
        if not buckets or any(h < 1 or w < 1 for h, w in buckets):
            raise ValueError(f"buckets must be a non-empty list of positive (height, width); got {self.buckets}.")
        object.__setattr__(self, "buckets", buckets)
        if self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or None (keep the clips' rate), got {self.fps}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability; got {self.caption_dropout}.")
        if self.seed < 0 or self.decode_threads < 0:
            raise ValueError(f"seed and decode_threads must be >= 0; got {self.seed}, {self.decode_threads}.")
        if self.video_dtype not in VIDEO_DTYPES:
            raise ValueError(f"video_dtype={self.video_dtype!r}; choose one of {VIDEO_DTYPES}.")
        object.__setattr__(self, "task_weights", self.task_config().task_weights)  # validated, all tasks named

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> CuratedLoaderConfig:
        """Reads the fields present in an ml_collections ConfigDict (or a dict); others keep defaults."""
        return config_from(cls, config, **overrides)

    def task_config(self) -> TaskSamplingConfig:
        return task_config_from(dataclasses.asdict(self))


# ------------------------------------------------------------------------------------------------
# Pure helpers (the batch plan and the frame mapping)


def nearest_bucket(height: np.ndarray | int, width: np.ndarray | int, buckets) -> np.ndarray:
    """Index of the bucket whose aspect ratio is nearest in log(height / width); ties to the first."""
    ratio = np.log(np.asarray(height, np.float64) / np.asarray(width, np.float64))
    targets = np.log(np.asarray([h / w for h, w in buckets], np.float64))
    return np.argmin(np.abs(ratio[..., None] - targets), axis=-1)


def _ratio(fps: float, target: float | None) -> float:
    return 1.0 if target is None else float(fps) / float(target)


def resampled_length(num_frames: np.ndarray | int, fps: np.ndarray | float, target_fps: float | None) -> np.ndarray:
    """Frames of a clip after resampling: the j >= 0 whose source frame ``floor(j r + 1/2)`` exists."""
    if target_fps is None:
        return np.asarray(num_frames, np.int64)
    r = np.asarray(fps, np.float64) / float(target_fps)
    return np.ceil((np.asarray(num_frames, np.float64) - 0.5 - _EPS) / r).astype(np.int64)


def source_frame_indices(start: int, length: int, fps: float, target_fps: float | None) -> np.ndarray:
    """Source frames of resampled frames ``start .. start + length - 1`` (nearest frame in time)."""
    j = np.arange(start, start + length, dtype=np.float64)
    return np.floor(j * _ratio(fps, target_fps) + 0.5 + _EPS).astype(np.int64)


def window_shots(frames: np.ndarray, cuts: np.ndarray | list[int]) -> tuple[int, np.ndarray]:
    """The shots a window shows: its first shot (0-based) and the count of its frames in each shot first..last.

    ``frames`` are the window's source frames (``source_frame_indices``; a frame shown twice counts twice),
    ``cuts`` the sample-relative shot starts, increasing. Frame ``f`` is in shot ``k`` = the number of cuts
    ``<= f``: a window that starts on a cut starts in that cut's shot. The range runs from the shot of the
    first frame to the shot of the last; a shot shorter than the resampling step that no window frame lands
    on is still in it (the window's time passes through it), with a count of 0. Counts sum to ``len(frames)``.
    """
    shot = np.searchsorted(np.asarray(cuts, np.int64), np.asarray(frames, np.int64), side="right")
    first = int(shot.min())
    return first, np.bincount(shot - first, minlength=int(shot.max()) - first + 1)


class _Plan:
    """Per epoch, the records of every global batch in order (each batch from one bucket)."""

    def __init__(self, bucket: np.ndarray, global_batch: int, shuffle_seed: int):
        self.global_batch = global_batch
        self.seed = mixed_shuffle_seed(shuffle_seed)
        self.members = [np.flatnonzero(bucket == g) for g in range(int(bucket.max(initial=-1)) + 1)]
        self.bucket_batches = [len(m) // global_batch for m in self.members]
        self.batches_per_epoch = sum(self.bucket_batches)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """``(batches_per_epoch, B)`` records and ``(batches_per_epoch,)`` bucket of each batch."""
        hit = self._cache.get(e)
        if hit is not None:
            return hit
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(e)]))
        rows, buckets = [], []
        for g, (m, n) in enumerate(zip(self.members, self.bucket_batches, strict=True)):
            shuffled = m[rng.permutation(len(m))]
            rows.append(shuffled[:n * self.global_batch].reshape(n, self.global_batch))
            buckets.append(np.full(n, g))
        rows, buckets = np.concatenate(rows), np.concatenate(buckets)
        order = rng.permutation(len(rows))
        out = (rows[order], buckets[order])
        if len(self._cache) >= 2:
            self._cache.pop(min(self._cache))
        self._cache[e] = out
        return out


class _PlanMapDataset(grain.MapDataset):
    """Global example position -> (epoch, record): batch s of the stream is positions [s B, (s + 1) B)."""

    def __init__(self, plan: _Plan, num_epochs: int | None):
        super().__init__()
        self._plan = plan
        per_epoch = plan.batches_per_epoch * plan.global_batch
        self._per_epoch = per_epoch
        self._length = per_epoch * num_epochs if num_epochs is not None else sys.maxsize // per_epoch * per_epoch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index) % self._length, self._per_epoch)
        rows, _ = self._plan.epoch(epoch)
        return epoch, int(rows.reshape(-1)[pos])

    def __str__(self) -> str:
        return f"_PlanMapDataset(batches_per_epoch={self._plan.batches_per_epoch}, B={self._plan.global_batch})"


# ------------------------------------------------------------------------------------------------
# Reading and decoding


def _open(cfg: CuratedLoaderConfig) -> Shards:
    if not cfg.data_dir:
        raise ValueError("CuratedLoaderConfig.data_dir is empty: set it to the curated directory (or its tfds/).")
    return Shards(cfg.data_dir, cfg.split)


def decode_frames(data: bytes, indices: np.ndarray, height: int, width: int, threads: int = 1) -> np.ndarray:
    """``(len(indices), height, width, 3)`` uint8: the clip frames ``indices`` (repeats allowed), resized to
    cover ``height x width`` with the aspect ratio kept, then center-cropped. Decodes only up to the last one."""
    import av

    indices = np.asarray(indices, np.int64)
    wanted: dict[int, list[int]] = {}
    for pos, i in enumerate(indices.tolist()):
        wanted.setdefault(i, []).append(pos)
    last = int(indices.max())
    out = np.empty((len(indices), height, width, 3), np.uint8)
    found = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        h, w = stream.codec_context.height, stream.codec_context.width
        scale = max(height / h, width / w)
        rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
        top, left = (rh - height) // 2, (rw - width) // 2
        for n, frame in enumerate(container.decode(stream)):
            if n in wanted:
                if (rh, rw) == (h, w):
                    pixels = frame.to_ndarray(format="rgb24")
                else:
                    pixels = frame.to_ndarray(format="rgb24", width=rw, height=rh, interpolation="BICUBIC")
                crop = pixels[top:top + height, left:left + width]
                for pos in wanted[n]:
                    out[pos] = crop
                found += 1
            if n >= last:
                break
    if found < len(wanted):
        raise ValueError(f"the clip has fewer frames than needed (frame {last} asked, {n + 1} decoded): the stored "
                         "clip and the manifest's num_frames disagree; rebuild the curated directory.")
    return out


def curated_loader_config(cfg: Any) -> CuratedLoaderConfig:
    """A training config's curated-loader settings: windows of its video size, its task draw (``data.tasks``),
    caption embeddings padded to ``text.max_length`` when the model is text-conditioned."""
    v, c = cfg.video, cfg.data.curated
    text = cfg.get("text")
    conditioned = text is not None and bool(text.get("conditioning", False))
    tasks = cfg.data.get("tasks")
    return CuratedLoaderConfig(
        data_dir=str(c.dir), split=str(c.split), clip_frames=int(v.num_frames), fps=float(c.fps) or None,
        buckets=((int(v.height), int(v.width)),), caption_dropout=float(c.caption_dropout),
        text_length=int(text.max_length) if conditioned else None, decode_threads=int(c.decode_threads),
        seed=int(cfg.seed), **({} if tasks is None else tasks.to_dict()))


def text_metadata(cfg: CuratedLoaderConfig) -> dict | None:
    """The dataset's text-embedding metadata (``dim``, ``max_length``, ``dtype``...), None when built without any."""
    return _open(cfg).text


def _to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``x / 127.5 - 1`` with one allocation (this pass costs as much as the decode at 480p)."""
    out = np.empty(pixels.shape, np.float32)
    np.divide(pixels, np.float32(127.5), out=out, dtype=np.float32)
    return np.subtract(out, np.float32(1.0), out=out)


class ExampleMaker:
    """(epoch, record) -> one example dict (see the module doc); the latent-cache writer makes its examples so."""

    def __init__(self, cfg: CuratedLoaderConfig, data: Shards):
        self.cfg, self.data = cfg, data
        self.task_cfg = cfg.task_config()
        idx = data.index
        self.bucket = nearest_bucket(idx["height"], idx["width"], cfg.buckets)
        self.length = resampled_length(idx["num_frames"], idx["fps"], cfg.fps)
        self.text_length = None
        if data.text is not None:
            self.text_length = int(cfg.text_length or data.text["max_length"])

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, record = item
        cfg, idx = self.cfg, self.data.index
        rec = self.data.record(record)
        rec_id = rec["id"].decode() if isinstance(rec["id"], bytes) else str(rec["id"])
        if rec_id != idx["id"][record]:
            raise ValueError(f"record {record} of {self.data.path} is {rec_id} but its index lists "
                             f"{idx['id'][record]}: the index does not belong to these shards; rebuild.")
        t = cfg.clip_frames
        window_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(epoch), int(record), 1]))
        start = int(window_rng.integers(0, int(self.length[record]) - t + 1))
        frames = source_frame_indices(start, t, float(idx["fps"][record]), cfg.fps)
        h, w = cfg.buckets[int(self.bucket[record])]
        pixels = decode_frames(rec["clip"], frames, h, w, threads=cfg.decode_threads)
        sample_cuts = np.asarray(rec["cuts"]).tolist()
        cuts = [int(np.searchsorted(frames, c, side="left")) for c in sample_cuts]
        spec = sample_task(t, [j for j in cuts if 0 < j < t], seed=cfg.seed, index=(int(epoch), int(record)),
                           cfg=self.task_cfg)
        drop_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, int(epoch), int(record), 2]))
        dropped = bool(drop_rng.random() < cfg.caption_dropout)
        first, counts = window_shots(frames, sample_cuts)
        shots = (first, first + len(counts) - 1, len(sample_cuts) + 1)  # first, last, the sample's shot count
        whole = rec["caption"].decode() if isinstance(rec["caption"], bytes) else str(rec["caption"])
        try:
            caption = shot_range_caption(whole, *shots[:2], num_shots=shots[2])
        except ValueError as e:
            raise ValueError(f"record {record} ({rec_id}) of {self.data.path}: {e}; rebuild the shards (the build "
                             "checks every caption against its cuts).") from None
        shot_frames = np.zeros(t, np.int32)
        shot_frames[:len(counts)] = counts
        out = {
            "video": pixels if cfg.video_dtype == "uint8" else _to_float(pixels),
            "given": spec.given, "given_start": spec.given_start,
            "task": np.int32(spec.task_id), "index": np.int64(record),
            "frame_index": frames.astype(np.int32),
            "caption": np.asarray("" if dropped else caption), "caption_dropped": np.bool_(dropped),
            "shot_frames": shot_frames,
        }
        if self.text_length is not None:
            out["text"], out["text_mask"] = self._text(rec, None if dropped else shots)
        return out

    def _text(self, rec: dict, shots: tuple[int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """The padded embedding of shots ``(first, last, num_shots)``' caption; None: the dropped caption's."""
        n, dim = self.text_length, int(self.data.text["dim"])
        emb = self.data.empty_caption if shots is None else range_embedding(rec, *shots).astype(np.float32)
        text, mask = np.zeros((n, dim), np.float32), np.zeros(n, bool)
        if emb is not None:
            if len(emb) > n:
                raise ValueError(f"a caption embedding has {len(emb)} tokens, more than text_length={n}; raise "
                                 "text_length (or leave it unset: the cache's max_length).")
            text[:len(emb)], mask[:len(emb)] = emb, True
        return text, mask


# ------------------------------------------------------------------------------------------------
# The dataset


def _eligible_buckets(cfg: CuratedLoaderConfig, data: Shards) -> np.ndarray:
    idx = data.index
    bucket = nearest_bucket(idx["height"], idx["width"], cfg.buckets).astype(np.int64)
    short = resampled_length(idx["num_frames"], idx["fps"], cfg.fps) < cfg.clip_frames
    if short.any():
        log.info("%d of %d records of %s are shorter than %d frames at %s fps and are not used", int(short.sum()),
                 len(short), data.path, cfg.clip_frames, cfg.fps or "their own")
    bucket[short] = -1
    return bucket


def batch_plan(cfg: CuratedLoaderConfig, *, global_batch_size: int, shuffle_seed: int, epoch: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ``epoch``'s global batches: ``(num_batches, global_batch_size)`` record indices and each batch's
    bucket index into ``cfg.buckets`` (the order ``make_curated_dataset`` reads them in)."""
    plan = _Plan(_eligible_buckets(cfg, _open(cfg)), global_batch_size, shuffle_seed)
    return plan.epoch(epoch)


def make_curated_dataset(cfg: CuratedLoaderConfig, *, global_batch_size: int, process_index: int = 0,
                         process_count: int = 1, shuffle_seed: int, num_epochs: int | None = None
                         ) -> grain.MapDataset:
    """This process's batches of ``global_batch_size // process_count`` curated examples (a Grain MapDataset).

    Same contract as ``synthetic_loader.make_dataset``: the process batches of a step, stacked in
    process order, are the single-process global batch. ``num_epochs=None`` repeats forever. Iterate
    with ``make_iterator`` (workers, JSON state).
    """
    local_batch = check_host_batch(global_batch_size=global_batch_size, process_index=process_index,
                                   process_count=process_count, shuffle_seed=shuffle_seed, num_epochs=num_epochs)
    data = _open(cfg)
    bucket = _eligible_buckets(cfg, data)
    plan = _Plan(bucket, global_batch_size, shuffle_seed)
    if plan.batches_per_epoch == 0:
        counts = {cfg.buckets[g]: len(m) for g, m in enumerate(plan.members)}
        raise ValueError(f"{data.path} split {cfg.split!r} fills no global batch of {global_batch_size}: usable "
                         f"records per bucket {counts} ({int((bucket < 0).sum())} too short for "
                         f"{cfg.clip_frames} frames); lower the batch size or clip_frames, or use fewer buckets.")
    ds = _PlanMapDataset(plan, num_epochs)
    ds = HostRowsMapDataset(ds, local_batch, process_index, process_count)
    ds = ds.map(ExampleMaker(cfg, data))
    return ds.batch(local_batch, drop_remainder=True)
