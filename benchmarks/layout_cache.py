"""Fixed-layout latent caches for the SR benchmark: synthetic clips encoded once per timeline layout, and
the trainer's own jitted step run on random rows of them.

``benchmarks/sr.py`` measures Director-SR on synthetic clips with one keyframe layout, where the
product's latent cache (``python -m director_jax.encode``: curated shards, per-example timelines)
does not apply; the CPU demo and every real run train through ``python -m director_jax.train``.
This is the benchmark's own harness, kept apart from the package.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from director_jax.models.multichunk import pad_to_length
from director_jax.models.timeline import TimelineLayout, padded_length
from director_jax.models.vae import WanVAE, normalize_latents
from director_jax.pipeline.codec import jitted_codec
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.trainer import build_run


@dataclasses.dataclass
class LayoutCache:
    """Normalized chunk latents of N clips over one timeline layout (and their low-res twins for SR)."""

    layout: TimelineLayout
    latents: np.ndarray  # (N, L, h, w, z) float32
    lowres_latents: np.ndarray | None = None  # (N, L, h, w, z): the degraded, upsampled clips' (SR)

    def __len__(self) -> int:
        return len(self.latents)


def encode_layouts(vae: WanVAE, clips: np.ndarray, layouts: Sequence[TimelineLayout], *,
                   lowres: np.ndarray | None = None, batch: int = 8, encode: Callable | None = None,
                   progress: bool = True) -> list[LayoutCache]:
    """Each clip (N, T, H, W, 3) encoded over each layout, chunk by chunk as the timeline encodes at sampling time.

    A chunk is a frame span (start, length) encoded on its own, so layouts that share a span (every
    layout with a keyframe at frame 0, say) share its latents: each distinct span is encoded once
    per clip (the demo's 11 layouts: 23 chunks of 187 frames, 11 distinct spans of 96).
    """
    encode = encode or jitted_codec(vae)[0]
    for layout in layouts:
        if layout.timeline.num_frames != clips.shape[1]:
            raise ValueError(f"a layout of {layout.timeline.num_frames} frames for clips of {clips.shape[1]}.")
    spans_by_length: dict[int, list[tuple[int, int]]] = {}
    for span in sorted({(c.start, c.length) for layout in layouts for c in layout.chunks}):
        spans_by_length.setdefault(padded_length(span[1]), []).append(span)
    sources = [("latents", clips)] + ([("lowres", lowres)] if lowres is not None else [])
    encoded: dict[tuple[str, tuple[int, int]], list[np.ndarray]] = {}
    bar = tqdm(total=len(clips), desc="latent cache", unit="clip", dynamic_ncols=True, disable=not progress)
    for first in range(0, len(clips), batch):
        for name, video in sources:
            part = jnp.asarray(video[first:first + batch])
            b = part.shape[0]
            for length, spans in spans_by_length.items():
                stacked = jnp.concatenate([pad_to_length(part[:, s:s + n], length) for s, n in spans], axis=0)
                mean, _ = encode(stacked)
                latents = np.asarray(normalize_latents(mean, vae.config), np.float32)
                for k, span in enumerate(spans):
                    encoded.setdefault((name, span), []).append(latents[k * b:(k + 1) * b])
        bar.update(min(batch, len(clips) - first))
    bar.close()

    def gather(name: str, layout: TimelineLayout) -> np.ndarray:
        return np.concatenate([np.concatenate(encoded[(name, (c.start, c.length))]) for c in layout.chunks], axis=1)

    return [LayoutCache(layout, gather("latents", layout), gather("lowres", layout) if lowres is not None else None)
            for layout in layouts]


def train_on_cache(cfg: ml_collections.ConfigDict, caches: Sequence[LayoutCache], workdir: str | Path, *,
                   keyframe_dropout: float = 0.0, progress: bool = True) -> dict:
    """Trains ``cfg``'s task (gen or sr, ``train.latents="precomputed"``) on random rows of ``caches``.

    Each step draws one layout (so a batch has one latent count; each count compiles once), then
    ``train.batch_size`` rows; for SR, a row's keyframes are dropped with ``keyframe_dropout`` (every
    frame generated: SR's dropout otherwise lives in its data path, which a cache skips; Gen drops
    keyframes in its loss, ``train.keyframe_dropout``). Writes a trainer checkpoint of the last step
    to ``workdir/checkpoints`` (read back by ``build`` / ``generate``) and returns the loss log.
    """
    cfg = cfg.copy_and_resolve_references()
    if cfg.train.latents != "precomputed" or cfg.train.get("timelines") != "per_example":
        raise ValueError("train_on_cache needs train.latents='precomputed' and train.timelines='per_example'.")
    steps, b = int(cfg.train.steps), int(cfg.train.batch_size)
    small = [len(c) for c in caches if len(c) < b]
    if not caches or small:
        raise ValueError(f"every layout needs at least train.batch_size={b} cached clips (got {small or 'none'}).")
    run = build_run(cfg, devices=jax.devices()[:1])
    state = jax.jit(run.init, out_shardings=run.shardings)()
    rng = np.random.default_rng(int(cfg.seed))
    place = run.batch_sharding
    history, recent = [], []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"train {run.task.name}", unit="step", dynamic_ncols=True, disable=not progress)
    for i in bar:
        cache = caches[int(rng.integers(len(caches)))]
        rows = rng.choice(len(cache), b, replace=False)
        length = cache.layout.num_latents
        given = np.broadcast_to(np.asarray(cache.layout.given), (b, length)).copy()
        if keyframe_dropout > 0:
            given &= (rng.random(b) >= keyframe_dropout)[:, None]
        batch = {"latents": cache.latents[rows], "latent_given": given, "latent_valid": np.ones((b, length), bool),
                 "latent_position": np.broadcast_to(np.asarray(cache.layout.position, np.float32), (b, length))}
        if cache.lowres_latents is not None:
            batch["lowres_latents"] = cache.lowres_latents[rows]
        missing = set(place) - set(batch)
        if missing:
            raise ValueError(f"the {run.task.name} task needs batch fields {sorted(missing)} the cache does not hold.")
        batch = {k: jax.device_put(np.asarray(batch[k], run.batch_fields[k].dtype), place[k]) for k in place}
        state, metrics = run.step_fn(state, run.frozen_state, batch)
        recent.append(metrics["loss"])
        if (i + 1) % int(cfg.train.log_every) == 0 or i + 1 == steps:
            mean = float(np.mean(jax.device_get(recent)))
            recent = []
            history.append({"step": i + 1, "loss": mean, "seconds": round(time.perf_counter() - start, 1)})
            bar.set_postfix(loss=f"{mean:.4f}")
    skips = int(jax.device_get(state.nonfinite_skips))
    ckpt = Checkpointer(Path(workdir) / "checkpoints", cfg.checkpoint)
    meta = {"config": cfg.to_json_best_effort(), "task": run.task.name, "mesh": dict(run.mesh.shape),
            "process_count": 1, "data_worker_count": 0, "step": steps, "source": "latent cache"}
    note = {"note": "trained on a fixed-layout latent cache (benchmarks/layout_cache.py)"}
    ckpt.save(steps, state, note, meta, wait=True)
    ckpt.close()
    return {"history": history, "nonfinite_skips": skips, "seconds": round(time.perf_counter() - start, 1)}
