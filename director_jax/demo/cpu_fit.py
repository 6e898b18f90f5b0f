"""The demo's VAE fit on a CPU, and the latent statistics a freshly fitted VAE measures for itself.

The CPU demo's VAE is fitted from scratch in minutes with what a short CPU fit needs beyond the
trainer's VAE task: mixed views (single frames and clip crops per step), an MSE term and the
temporal anchor loss (``fit_vae``). Director-Gen and SR then train through the trainer itself
(``python -m director_jax.train`` on the demo's latent caches: ``demo/stages.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from director_jax.models.vae import WanVAE, kl_divergence
from director_jax.pipeline.codec import jitted_codec
from director_jax.train.losses import temporal_anchor_loss

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
