"""Writes the latent cache (``director_jax.data.latent_cache``): distributed over hosts, resumable, reproducible.

Every host takes the shards ``s`` with ``s % process_count == process_index``; a shard's bytes depend
only on the job (config, VAE, K, shard size, encode batch), never on the host or on earlier runs, so
a crash and rerun adds nothing twice and gives the same files: a shard is written to a temporary file
and renamed into place (complete shard files are skipped; this host's leftover temporary files are
deleted first). The host that finds every shard present writes ``manifest.json`` (atomically, the same
bytes whoever writes it).

An example is the curated loader's own (``loader.ExampleMaker`` at epoch ``k``, caption dropout off):
the same window, resize and task draw the trainer would see. Its chunks are encoded as
``multichunk.encode_timeline`` encodes them (each chunk padded by repeating its last frame); the
chunks of ``batch`` examples that share a padded length go through the VAE together, in calls of
``batch`` chunks (the last padded), so each padded length compiles once.

A Director-SR config (``task="sr"``) also stores ``lowres_latents``: the clip degraded by the SR
task's seeded data path (``degrade_float(clip, degradation, (seed, record))``, what
``train.sr_task.degrade_batch`` gives the same example), upsampled back and encoded over the same
timeline, so SR trains on the cache as on pixels, minus the degradations and both VAE encodes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from director_jax.build import frozen_vae
from director_jax.data import latent_cache as fmt
from director_jax.data.degradations import DegradationConfig, degrade_float
from director_jax.data.loader import ExampleMaker, curated_loader_config, resampled_length
from director_jax.data.row_timelines import row_layout
from director_jax.data.shards import Shards, read_build_info
from director_jax.data.text_embeddings import np_dtype
from director_jax.errors import UserError
from director_jax.io_utils import atomic_write, atomic_write_text, writable_dir_problem
from director_jax.models.vae import WanVAE, normalize_latents

log = logging.getLogger(__name__)

TASKS = ("gen", "sr")


class OtherJobError(UserError):
    """The cache directory holds another job's cache (other config, VAE, clips or K): nothing is written."""


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    """What one cache holds, fixed before any work: the same on every host and every rerun."""

    cache_dir: Path
    loader: Any  # CuratedLoaderConfig (caption dropout off, unpadded text)
    data: Shards
    clips: np.ndarray  # usable curated records, in record order
    timelines_per_clip: int
    shard_size: int
    batch: int
    latent_dtype: str
    task: str = "gen"
    degradation: DegradationConfig | None = None  # task "sr": the SR task's seeded degradations
    seed: int = 0

    @property
    def num_examples(self) -> int:
        return len(self.clips) * self.timelines_per_clip

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_examples / self.shard_size)

    def shard_path(self, shard: int) -> Path:
        return self.cache_dir / fmt.shard_name(shard, self.num_shards)

    def shard_examples(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples))


def plan_job(cfg: ml_collections.ConfigDict, cache_dir: str | os.PathLike, *, timelines_per_clip: int = 1,
             shard_size: int = 64, batch: int = 4, latent_dtype: str = "bfloat16") -> EncodeJob:
    """Checks the inputs (one-line ``UserError``s, before any work) and fixes the job's examples."""
    task = cfg.get("task")
    if task not in TASKS:
        raise UserError(f"config.task={task!r}: the latent cache feeds Director-Gen or Director-SR; use a gen or sr "
                        "config.")
    if str(cfg.train.get("timelines", "fixed")) != "per_example":
        raise UserError("the latent cache holds per-example timelines: set --config.train.timelines=per_example.")
    if min(timelines_per_clip, shard_size, batch) < 1:
        raise UserError(f"--timelines_per_clip ({timelines_per_clip}), --shard_size ({shard_size}) and --batch "
                        f"({batch}) must be >= 1.")
    if latent_dtype not in fmt.LATENT_DTYPES:
        raise UserError(f"--latent_dtype={latent_dtype!r}; choose one of {fmt.LATENT_DTYPES}.")
    if not cfg.vae.get("init_from"):
        raise UserError("config.vae.init_from is empty: name the VAE whose latents to cache (--config.vae.init_from).")
    if not str(cfg.data.curated.dir):
        raise UserError("config.data.curated.dir is empty: set --config.data.curated.dir to the curated directory.")
    loader = dataclasses.replace(curated_loader_config(cfg), caption_dropout=0.0, text_length=None)
    try:
        data = Shards(loader.data_dir, loader.split)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from e
    problem = writable_dir_problem(cache_dir)
    if problem:
        raise UserError(f"--cache_dir: {problem}.")
    idx = data.index
    clips = np.flatnonzero(resampled_length(idx["num_frames"], idx["fps"], loader.fps) >= loader.clip_frames)
    if len(clips) == 0:
        raise UserError(f"{data.path} split {loader.split!r} has no clip of {loader.clip_frames} frames at "
                        f"{loader.fps or 'their own'} fps: lower video.num_frames.")
    degradation = None
    if task == "sr":
        degradation = DegradationConfig.from_config(cfg.degradation)
        if len(degradation.scales) != 1:
            raise UserError(f"degradation.scales={degradation.scales}: an SR model upsamples by one factor.")
    return EncodeJob(Path(cache_dir), loader, data, clips, timelines_per_clip, shard_size, batch, latent_dtype,
                     task, degradation, int(cfg.seed))


def vae_fingerprint(vae: WanVAE) -> str:
    """sha256 of the VAE's config and weights (path-independent: which latents these are)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(vae.config), sort_keys=True, default=str).encode())
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(vae, nnx.Param)),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def job_spec(job: EncodeJob, cfg: ml_collections.ConfigDict, vae: WanVAE, fingerprint: str) -> dict[str, Any]:
    """``job.json``: everything the shards' bytes depend on (compared on reruns) and the config for reference."""
    loader, f = job.loader, vae.config.spatial_factor
    build = read_build_info(job.data.path.parents[1]) or {}
    spec = {
        "format": fmt.FORMAT, "curated": str(job.data.path), "split": loader.split,
        "curated_digest": build.get("digest"), "num_clips": len(job.clips),
        "clips_digest": hashlib.sha256(job.clips.astype("<i8").tobytes()).hexdigest(),
        "clip_frames": loader.clip_frames, "height": loader.buckets[0][0], "width": loader.buckets[0][1],
        "fps": loader.fps, "seed": loader.seed, "tasks": dict(dataclasses.asdict(loader.task_config())),
        "timelines_per_clip": job.timelines_per_clip, "shard_size": job.shard_size, "batch": job.batch,
        "num_examples": job.num_examples, "num_shards": job.num_shards, "latent_dtype": job.latent_dtype,
        "latent_shape": [loader.buckets[0][0] // f, loader.buckets[0][1] // f, vae.config.z_dim],
        "vae": {"init_from": str(cfg.vae.init_from), "fingerprint": fingerprint}, "task": job.task,
        "degradation": None if job.degradation is None else dataclasses.asdict(job.degradation),
        "text": job.data.text, "config": json.loads(cfg.to_json_best_effort()),
    }
    return json.loads(json.dumps(spec, sort_keys=True, default=str))  # as job.json reads back (lists, not tuples)


def _check_or_write_spec(job: EncodeJob, spec: dict[str, Any]) -> None:
    path = job.cache_dir / fmt.JOB_FILE
    old = fmt.read_json(path)
    if old is None:
        atomic_write_text(path, json.dumps(spec, indent=1, sort_keys=True))
        return
    differ = sorted(k for k in set(old) | set(spec) if k != "config" and old.get(k) != spec.get(k))
    if differ:
        raise OtherJobError(f"{job.cache_dir} holds another job's cache ({', '.join(differ)} differ); use a new "
                        "--cache_dir or delete the old one.")


class ChunkEncoder:
    """(n, P, H, W, 3) chunks -> normalized posterior means, in calls of ``batch`` chunks (one compile per P)."""

    def __init__(self, vae: WanVAE, batch: int):
        graphdef, self.state = nnx.split(vae)
        self.batch = batch

        def encode(state, clips):
            model = nnx.merge(graphdef, state)
            mean, _ = model.encode(clips)
            return normalize_latents(mean, model.config)

        self._encode = jax.jit(encode)

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(clips), self.batch):
            part = clips[i:i + self.batch]
            n = len(part)
            if n < self.batch:  # pad with the last chunk: every call has one shape
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - n, axis=0)])
            out.append(np.asarray(self._encode(self.state, jnp.asarray(part)))[:n])
        return np.concatenate(out)


def encode_examples(examples: list[dict[str, np.ndarray]], encoder: Callable[[np.ndarray], np.ndarray],
                    pixels: str = "video") -> list[np.ndarray]:
    """Each example's normalized latents (L, h, w, z) of ``example[pixels]`` over its own timeline, as
    ``encode_timeline`` lays them out."""
    layouts = [row_layout(e["given"], e["given_start"]) for e in examples]
    groups: dict[int, list[tuple[int, Any]]] = {}
    for i, layout in enumerate(layouts):
        for c in layout.chunks:
            groups.setdefault(c.padded_length, []).append((i, c))
    per_chunk: dict[tuple[int, int], np.ndarray] = {}
    for length in sorted(groups):
        clips = np.stack([_padded(examples[i][pixels][c.start:c.end], length) for i, c in groups[length]])
        for (i, c), latent in zip(groups[length], encoder(clips), strict=True):
            per_chunk[i, c.index] = latent
    return [np.concatenate([per_chunk[i, c.index] for c in layout.chunks]) for i, layout in enumerate(layouts)]


def _with_upsampled(example: dict[str, np.ndarray], *, job: EncodeJob) -> dict[str, np.ndarray]:
    """Adds the SR input: the clip degraded as the SR task's data path does for this record, upsampled back."""
    out = degrade_float(example["video"], job.degradation, (job.seed, int(example["index"])))
    return {**example, "upsampled": out.upsampled}


def _padded(frames: np.ndarray, length: int) -> np.ndarray:
    """As ``multichunk.pad_to_length``: the last frame repeated."""
    return np.concatenate([frames, np.repeat(frames[-1:], length - len(frames), axis=0)]) if len(frames) < length \
        else frames


def _write_shard(job: EncodeJob, shard: int, make: ExampleMaker, encoder: ChunkEncoder, pool, on_example) -> None:
    """Encodes shard ``shard``'s examples and writes them as one ArrayRecord file (temp file + rename)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    ids = list(job.shard_examples(shard))
    k_of = job.timelines_per_clip
    text_dtype = np_dtype(job.data.text["dtype"]) if job.data.text else None
    out_dtype = np_dtype(job.latent_dtype)
    records = []
    for start in range(0, len(ids), job.batch):
        group = ids[start:start + job.batch]
        examples = list(pool.map(make, [(e % k_of, int(job.clips[e // k_of])) for e in group]))
        lowres = None
        if job.task == "sr":
            examples = list(pool.map(functools.partial(_with_upsampled, job=job), examples))
            lowres = encode_examples(examples, encoder, "upsampled")
        for n, (e, example, latents) in enumerate(zip(group, examples, encode_examples(examples, encoder),
                                                      strict=True)):
            rec = {"latents": latents.astype(out_dtype), "given": example["given"],
                   "given_start": example["given_start"], "task": example["task"], "index": example["index"],
                   "timeline": np.int32(e % k_of), "frame_index": example["frame_index"]}
            if lowres is not None:
                rec["lowres_latents"] = lowres[n].astype(out_dtype)
            if text_dtype is not None:
                rec["text"] = example["text"][example["text_mask"]].astype(text_dtype)
            records.append(fmt.encode_record(rec))
            on_example()

    def write(tmp: str) -> None:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()

    atomic_write(job.shard_path(shard), write)


def _discard_temporary(job: EncodeJob, shards: list[int]) -> None:
    """Removes this host's partial shard files (``atomic_write``'s ``.NAME.*.tmp*``) left by a killed run."""
    for s in shards:
        for tmp in job.cache_dir.glob(f".{job.shard_path(s).name}.*"):
            log.info("removing %s (a partial shard of an interrupted run)", tmp.name)
            tmp.unlink(missing_ok=True)


def write_manifest(job: EncodeJob, spec: dict[str, Any]) -> dict[str, Any] | None:
    """``manifest.json`` once every shard exists (None while some are missing: another host writes it)."""
    paths = [job.shard_path(s) for s in range(job.num_shards)]
    if not all(p.is_file() for p in paths):
        return None
    from array_record.python.array_record_module import ArrayRecordReader

    counts = []
    shards = []
    for s, p in enumerate(paths):
        reader = ArrayRecordReader(str(p))
        n = reader.num_records()
        longest = max(fmt.decode_record(r)["latents"].shape[0] for r in reader.read_all())
        reader.close()
        if n != len(job.shard_examples(s)):
            raise RuntimeError(f"{p} holds {n} examples, expected {len(job.shard_examples(s))}: delete it and rerun.")
        counts.append(longest)
        shards.append({"file": p.name, "examples": n, "bytes": p.stat().st_size})
    manifest = {"format": fmt.FORMAT, "count": job.num_examples, "bytes": sum(s["bytes"] for s in shards),
                "max_latent_count": max(counts), "shards": shards, "job": spec}
    atomic_write_text(job.cache_dir / fmt.MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def write_latent_cache(cfg: ml_collections.ConfigDict, cache_dir: str | os.PathLike, *, timelines_per_clip: int = 1,
                       shard_size: int = 64, batch: int = 4, latent_dtype: str = "bfloat16", process_index: int = 0,
                       process_count: int = 1, decode_workers: int = 4, vae: WanVAE | None = None,
                       progress: bool = True) -> dict[str, Any] | None:
    """Encodes this host's shards of the cache (skipping complete ones); returns the manifest when complete."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count}).")
    job = plan_job(cfg, cache_dir, timelines_per_clip=timelines_per_clip, shard_size=shard_size, batch=batch,
                   latent_dtype=latent_dtype)
    log.info("encode: %d clips of %s x %d timelines = %d examples in %d shards of %d", len(job.clips), job.data.path,
             timelines_per_clip, job.num_examples, job.num_shards, shard_size)
    vae = frozen_vae(cfg) if vae is None else vae
    fingerprint = vae_fingerprint(vae)
    log.info("VAE: %s (fingerprint %s)", cfg.vae.init_from, fingerprint[:16])
    spec = job_spec(job, cfg, vae, fingerprint)
    _check_or_write_spec(job, spec)
    if job.data.empty_caption is not None and not (job.cache_dir / fmt.EMPTY_CAPTION_FILE).is_file():
        atomic_write(job.cache_dir / fmt.EMPTY_CAPTION_FILE, lambda tmp: np.save(tmp, job.data.empty_caption))
    mine = list(range(process_index, job.num_shards, process_count))
    _discard_temporary(job, mine)
    todo = [s for s in mine if not job.shard_path(s).is_file()]
    done = sum(len(job.shard_examples(s)) for s in mine if s not in todo)
    log.info("host %d of %d: %d shards, %d complete already, %d to encode", process_index, process_count, len(mine),
             len(mine) - len(todo), len(todo))
    make = ExampleMaker(job.loader, job.data)
    encoder = ChunkEncoder(vae, batch)
    bar = tqdm(total=sum(len(job.shard_examples(s)) for s in mine), initial=done, unit="example", desc="encode",
               disable=not progress, dynamic_ncols=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(max(decode_workers, 1)) as pool:
            for s in todo:
                _write_shard(job, s, make, encoder, pool, lambda: bar.update(1))
    finally:
        bar.close()
    manifest = write_manifest(job, spec)
    if manifest is None:
        log.info("this host's shards are written; the last host to finish writes the manifest")
    else:
        log.info("cache complete: %d examples, %.1f MB, manifest %s", manifest["count"], manifest["bytes"] / 1e6,
                 job.cache_dir / fmt.MANIFEST_FILE)
    return manifest
