"""The latent cache: Director-Gen / SR examples as normalized chunk latents, so training skips decode + VAE.

``python -m director_jax.encode`` (``director_jax.curation.latent_writer``) writes it from the curated
shards; ``make_latent_dataset`` reads it with the same contract as the other loaders
(``director_jax.data.iterators``: host rows, JSON iterator state, deterministic in the seeds).

**Layout** of a cache directory::

    job.json                          what the job encodes (checked on every rerun: no mixing of two jobs)
    shard-00000-of-00004.array_record one ArrayRecord file per fixed group of ``shard_size`` examples
    empty_caption.npy                 the empty caption's embedding (caption dropout), when the shards hold it
    manifest.json                     written last, once every shard exists: the cache is complete

Example ``e`` is timeline ``k = e % K`` of usable clip ``j = e // K`` (``K = timelines_per_clip``;
usable clips are the split's records long enough for the window, in record order). Timeline ``k`` is
the curated loader's example of epoch ``k`` (same window, same task draw), so a cache of K timelines
holds the first K epochs' draws. Each record is one example, serialized by ``encode_record``: a
little-endian header (JSON: name -> dtype, shape) and the raw arrays, in a fixed order (byte-identical
reruns). Fields: ``latents`` (L, h, w, z) at the row's own latent count L in ``latent_dtype``
(bfloat16 by default: half of float32, and the DiT computes in bf16 anyway), ``given`` /
``given_start`` (T,) bool, ``task`` int32, ``index`` int64 (the curated record), ``timeline`` int32,
``frame_index`` (T,) int32, for a Director-SR cache ``lowres_latents`` (L, h, w, z) (the degraded,
upsampled clip's, same timeline) and, with caption embeddings, ``text`` (Lt, D) in the shards' text dtype
(the window's caption, of the shots it shows, as the loader gives it; unpadded, before caption
dropout: the reader drops captions per epoch).

**Reading**: reader epoch ``e`` shows every usable clip once, timeline ``e % K``, shuffled and cut into
global batches (the remainder is dropped); rows are padded to ``max_latents`` with ``latent_valid``
False past each row's count, as ``data/row_timelines.py:plan_rows`` lays them out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from director_jax.data.degradations import DegradationConfig
from director_jax.data.iterators import HostRowsMapDataset, check_host_batch, config_from, mixed_shuffle_seed
from director_jax.data.row_timelines import row_layout
from director_jax.data.text_embeddings import np_dtype

__all__ = ["FORMAT", "LatentCacheConfig", "decode_record", "encode_record", "latent_cache_config",
           "make_latent_dataset", "read_manifest", "shard_name"]

FORMAT = 1
MAGIC = b"DJLC\x01"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
EMPTY_CAPTION_FILE = "empty_caption.npy"
LATENT_DTYPES = ("bfloat16", "float16", "float32")
CLI = "python -m director_jax.encode"


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.array_record"


def encode_record(arrays: Mapping[str, np.ndarray]) -> bytes:
    """One example as bytes: magic, header length, JSON header (sorted names), raw little-endian arrays."""
    header, parts = {}, []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])  # (not ascontiguousarray: it makes scalars 1-d); tobytes is C order
        header[name] = [a.dtype.name, list(a.shape)]
        parts.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(parts)


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of ``encode_record`` (arrays are read-only views of ``data``)."""
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError("not a latent-cache record (bad magic): the shard is damaged or from another format.")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start:start + n])
    offset, out = start + n, {}
    for name in sorted(header):
        dtype, shape = np_dtype(header[name][0]), tuple(header[name][1])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = np.frombuffer(data, dtype.newbyteorder("<"), int(np.prod(shape, dtype=np.int64)),
                                  offset).reshape(shape)
        offset += size
    return out


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The complete cache's manifest; a clear error for a missing or unfinished cache."""
    d = Path(cache_dir)
    manifest = read_json(d / MANIFEST_FILE)
    if manifest is None:
        what = "an unfinished job (rerun it to finish)" if (d / JOB_FILE).is_file() else "no latent cache"
        raise FileNotFoundError(f"{d / MANIFEST_FILE} is missing: {d} holds {what}; write it with `{CLI} --config "
                                f"CONFIG --cache_dir {d}`.")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d} is a latent cache of format {manifest.get('format')}; this reader reads {FORMAT}: "
                         "rewrite it.")
    return manifest


@dataclasses.dataclass(frozen=True)
class LatentCacheConfig:
    """Where the cache is and how its rows are laid out for the trainer."""

    dir: str = ""
    max_latents: int = 0  # pad every row's latents to this many (0: the cache's longest row)
    text_length: int | None = None  # pad text embeddings to this many tokens; None: no text fields
    caption_dropout: float = 0.0  # drawn per (seed, epoch, clip), as the curated loader does
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability; got {self.caption_dropout}.")
        if self.max_latents < 0 or self.seed < 0:
            raise ValueError(f"max_latents and seed must be >= 0; got {self.max_latents}, {self.seed}.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> LatentCacheConfig:
        return config_from(cls, config, **overrides)


def latent_cache_config(cfg: Any, *, max_latents: int) -> LatentCacheConfig:
    """The reader's settings for a training config (``data.latents.dir``), checked against the cache's job."""
    section = cfg.data.get("latents")
    directory = str(section.get("dir", "")) if section is not None else ""
    if not directory:
        raise ValueError(f"data.source='latents' needs --config.data.latents.dir (a cache written by `{CLI}`).")
    job = read_manifest(directory)["job"]
    v = cfg.video
    want = {"clip_frames": int(v.num_frames), "height": int(v.height), "width": int(v.width)}
    got = {k: job[k] for k in want}
    if got != want:
        raise ValueError(f"the latent cache {directory} holds {got}; the run wants {want}: encode the cache with "
                         "this run's config.")
    task = str(cfg.get("task"))
    if job.get("task", "gen") != task:
        raise ValueError(f"the latent cache {directory} was encoded for task {job.get('task', 'gen')!r}; this run "
                         f"trains {task!r}: encode a cache with this run's config (`{CLI} --config ...`).")
    if task == "sr":
        degradation = json.loads(json.dumps(dataclasses.asdict(DegradationConfig.from_config(cfg.degradation))))
        if job.get("degradation") != degradation:
            raise ValueError(f"the latent cache {directory} holds clips degraded with other settings than this "
                             "run's degradation section: encode a cache with this run's config.")
    conditioned = bool(cfg.text.get("conditioning", False))
    if conditioned and not job.get("text"):
        raise ValueError(f"the latent cache {directory} holds no caption embeddings but text.conditioning is on: "
                         "encode it from shards built with --text_cache, or set --config.text.conditioning=False.")
    dropout = float(section.get("caption_dropout", cfg.data.curated.caption_dropout))
    return LatentCacheConfig(dir=directory, max_latents=int(max_latents), seed=int(cfg.seed),
                             text_length=int(cfg.text.max_length) if conditioned else None, caption_dropout=dropout)


class _Cache:
    """The manifest's facts and the ArrayRecord source (opened lazily, once per process: pickles to workers)."""

    def __init__(self, cfg: LatentCacheConfig):
        if not cfg.dir:
            raise ValueError("LatentCacheConfig.dir is empty: set it to a latent cache directory.")
        self.dir = Path(cfg.dir)
        self.manifest = read_manifest(self.dir)
        job = self.manifest["job"]
        self.num_clips, self.timelines = int(job["num_clips"]), int(job["timelines_per_clip"])
        self.paths = [str(self.dir / s["file"]) for s in self.manifest["shards"]]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) of {self.dir} are missing (first: {missing[0]}).")
        self.text: dict | None = job.get("text") or None
        self.empty_caption = None
        if self.text is not None and (self.dir / EMPTY_CAPTION_FILE).is_file():
            self.empty_caption = np.load(self.dir / EMPTY_CAPTION_FILE).astype(np.float32)
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def record(self, example: int) -> dict[str, np.ndarray]:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return decode_record(self._source[example])


class _ClipPlan(grain.MapDataset):
    """Global example position -> (epoch, clip): epoch ``e`` is a seeded permutation of the clips, cut into
    whole global batches (batch s of the stream is positions [s B, (s + 1) B))."""

    def __init__(self, num_clips: int, global_batch: int, shuffle_seed: int, num_epochs: int | None):
        super().__init__()
        self._n, self._seed = num_clips, mixed_shuffle_seed(shuffle_seed)
        self._per_epoch = num_clips // global_batch * global_batch
        self._length = (self._per_epoch * num_epochs if num_epochs is not None
                        else sys.maxsize // self._per_epoch * self._per_epoch)
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, pos = divmod(int(index) % self._length, self._per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
            self._cache = (epoch, rng.permutation(self._n))
        return epoch, int(self._cache[1][pos])

    def __str__(self) -> str:
        return f"_ClipPlan(clips={self._n}, per_epoch={self._per_epoch})"


class _ReadRow:
    """(epoch, clip) -> one row: timeline ``epoch % K`` of the clip, padded, caption dropout drawn."""

    def __init__(self, cfg: LatentCacheConfig, cache: _Cache, max_latents: int):
        self.cfg, self.cache, self.max_latents = cfg, cache, max_latents

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, clip = item
        cache, size = self.cache, self.max_latents
        k = epoch % cache.timelines
        rec = cache.record(clip * cache.timelines + k)
        given, given_start = np.asarray(rec["given"], bool), np.asarray(rec["given_start"], bool)
        layout = row_layout(given, given_start)
        n = int(rec["latents"].shape[0])
        if n != layout.num_latents or n > size:
            raise ValueError(f"cached example {clip * cache.timelines + k} has {n} latents; its timeline has "
                             f"{layout.num_latents} and rows are padded to {size}: the cache is damaged or "
                             "max_latents is too small.")
        latents = np.zeros((size, *rec["latents"].shape[1:]), np.float32)
        latents[:n] = rec["latents"]
        out = {"latents": latents, "latent_given": np.zeros(size, bool), "latent_valid": np.zeros(size, bool),
               "latent_position": np.zeros(size, np.float32), "latent_count": np.int32(n),
               "given": given, "given_start": given_start, "task": np.int32(rec["task"]),
               "index": np.int64(rec["index"]), "timeline": np.int32(k)}
        out["latent_given"][:n], out["latent_valid"][:n], out["latent_position"][:n] = (
            layout.given, True, layout.position)
        if "lowres_latents" in rec:  # a Director-SR cache: the degraded clip's latents, laid out alike
            out["lowres_latents"] = np.zeros_like(latents)
            out["lowres_latents"][:n] = rec["lowres_latents"]
        if self.cfg.text_length is not None:
            drop = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, int(epoch), int(clip), 2]))
            dropped = bool(drop.random() < self.cfg.caption_dropout)
            out["text"], out["text_mask"] = self._text(rec, dropped)
            out["caption_dropped"] = np.bool_(dropped)
        return out

    def _text(self, rec: dict, dropped: bool) -> tuple[np.ndarray, np.ndarray]:
        n, dim = self.cfg.text_length, int(self.cache.text["dim"])
        emb = self.cache.empty_caption if dropped else np.asarray(rec["text"], np.float32)
        text, mask = np.zeros((n, dim), np.float32), np.zeros(n, bool)
        if emb is not None:
            if len(emb) > n:
                raise ValueError(f"a cached caption embedding has {len(emb)} tokens, more than text_length={n}.")
            text[:len(emb)], mask[:len(emb)] = emb, True
        return text, mask


def make_latent_dataset(cfg: LatentCacheConfig, *, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1, shuffle_seed: int, num_epochs: int | None = None) -> grain.MapDataset:
    """This process's batches of ``global_batch_size // process_count`` cached rows (a Grain MapDataset).

    Same contract as ``loader.make_curated_dataset``: the process batches of a step, stacked in process
    order, are the single-process global batch; iterate with ``iterators.make_iterator``.
    """
    local_batch = check_host_batch(global_batch_size=global_batch_size, process_index=process_index,
                                   process_count=process_count, shuffle_seed=shuffle_seed, num_epochs=num_epochs)
    cache = _Cache(cfg)
    longest = int(cache.manifest["max_latent_count"])
    max_latents = cfg.max_latents or longest
    if max_latents < longest:
        raise ValueError(f"the latent cache {cache.dir} has rows of up to {longest} latent frames; rows are padded to "
                         f"max_latents={max_latents}: add a bucket of {longest} (train.latent_buckets).")
    if cache.num_clips < global_batch_size:
        raise ValueError(f"the latent cache {cache.dir} holds {cache.num_clips} clips, fewer than one global batch "
                         f"of {global_batch_size}; lower the batch size or encode more clips.")
    ds = HostRowsMapDataset(_ClipPlan(cache.num_clips, global_batch_size, shuffle_seed, num_epochs), local_batch,
                            process_index, process_count)
    return ds.map(_ReadRow(cfg, cache, max_latents)).batch(local_batch, drop_remainder=True)
