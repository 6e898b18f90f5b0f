"""Single-device fits of the tiny models on a CPU: the VAE, then Gen and SR on a latent cache.

The CPU demo and the benchmarks train toy-width models for minutes, where encoding every clip with
the frozen VAE in every step would cost more than the step itself. So the VAE is fitted first
(``fit_vae``), every training clip is encoded once per timeline layout (``encode_layouts``), and Gen
or SR train through the trainer's own jitted step (optimizer, schedule, EMA, non-finite guard) on
random rows of that cache (``train_on_cache``), with the layout of each row in the batch
(``train.timelines = "per_example"``) so one model learns every keyframe placement. The result is a trainer
checkpoint, so ``generate`` and ``evaluate`` read it as they read any run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from director_jax.models.multichunk import pad_to_length
from director_jax.models.timeline import TimelineLayout, padded_length
from director_jax.models.vae import WanVAE, kl_divergence, normalize_latents
from director_jax.pipeline.codec import jitted_codec
from director_jax.train.checkpoint import Checkpointer
from director_jax.train.losses import temporal_anchor_loss
from director_jax.train.trainer import build_run

log = logging.getLogger(__name__)

# What the VAE fit sees at step i: (step, numpy rng) -> (B, T, H, W, 3) float32 clips in [-1, 1].
ClipSampler = Callable[[int, np.random.Generator], np.ndarray]


def fit_vae(vae: WanVAE, sample: ClipSampler, steps: int, *, learning_rate: float = 5e-3, seed: int = 0,
            kl_weight: float = 1e-6, mse_weight: float = 0.0, anchor_weight: float = 0.0, log_every: int = 100,
            progress: bool = True) -> list[dict]:
    """Fits ``vae`` in place (L1 on the decoded posterior mean + a tiny KL; Adam, warmup-cosine); returns the log.

    ``sample(i, rng)`` gives step ``i``'s clips: mix single frames (the causal VAE encodes a chunk's
    first frame alone, as keyframes are) with clips as long as the chunks decoded later (each later
    latent decodes with the caches of the ones before it). ``mse_weight`` adds the mean squared
    error: L1's gradient does not shrink with the error, MSE's does; with both a short fit reached
    +0.35 dB PSNR on frames (500 steps, 32x32 synthetic frames). ``anchor_weight`` pulls each
    later latent of a clip towards the image latent of its newest frame (``temporal_anchor_loss``).
    """
    if steps < 1:
        raise ValueError(f"the VAE fit needs at least one step, got {steps}.")
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps - 1), steps, learning_rate / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    graphdef, params = nnx.split(vae, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, video):
        def loss_fn(p):  # vae_loss's L1 + KL on the posterior mean, plus the MSE term
            model = nnx.merge(graphdef, p)
            mean, logvar = model.encode(video)
            error = model.decode(mean, clip=False) - video
            l1 = jnp.mean(jnp.abs(error))
            loss = l1 + kl_weight * jnp.mean(kl_divergence(mean, logvar)) + mse_weight * jnp.mean(jnp.square(error))
            if anchor_weight > 0 and video.shape[1] > 1:
                loss = loss + anchor_weight * temporal_anchor_loss(model, video, mean)
            return loss, {"l1": l1}

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux["l1"]

    rng = np.random.default_rng(seed)
    history, recent = [], []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="fit VAE", unit="step", dynamic_ncols=True, disable=not progress)
    for i in bar:
        params, opt_state, l1 = step(params, opt_state, jnp.asarray(sample(i, rng), jnp.float32))
        recent.append(l1)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            mean = float(np.mean(jax.device_get(recent)))
            recent = []
            history.append({"step": i + 1, "l1": mean, "seconds": round(time.perf_counter() - start, 1)})
            bar.set_postfix(l1=f"{mean:.4f}")
    nnx.update(vae, params)
    return history


def with_latent_stats(vae: WanVAE, videos: Sequence[np.ndarray], encode: Callable | None = None) -> WanVAE:
    """``vae`` with the per-channel mean / std of its posterior means on ``videos`` as its latent statistics.

    Director-Gen and SR train on normalized latents; Wan2.1 ships its statistics, a freshly fitted
    VAE measures its own (stored in its exported config, so every later reader normalizes alike).
    """
    encode = encode or jitted_codec(vae)[0]
    means = np.concatenate([np.asarray(encode(jnp.asarray(v[None]))[0]).reshape(-1, vae.config.z_dim) for v in videos])
    flat = means.astype(np.float64)
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(float(x) for x in flat.mean(0)),
                                     latents_std=tuple(float(x) for x in flat.std(0) + 1e-6))
    return vae


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
    ckpt.save(steps, state, {"note": "trained on a latent cache (demo/cpu_fit.py)"}, meta, wait=True)
    ckpt.close()
    return {"history": history, "nonfinite_skips": skips, "seconds": round(time.perf_counter() - start, 1)}
