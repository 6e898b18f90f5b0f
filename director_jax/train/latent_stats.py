"""The VAE task's running latent statistics: per-channel moments of the posterior mean of its training batches.

A Gen / SR run normalises latents by the VAE config's ``latents_mean`` / ``latents_std``; Wan2.1's
defaults are wrong for a VAE trained here. So a VAE run keeps, in its train state
(``TrainState.latent_stats``, replicated, saved with every checkpoint and restored on resume), an
exponential moving average (decay ``DECAY``) of each batch's per-channel mean of the posterior mean
``mu`` and of ``mu^2``, with the average's total weight ``1 - DECAY^n``, so that after any number of
steps ``sum / weight`` is a properly weighted mean (``build.latent_mean_std`` turns the three into
mean and std when the run is reused).

The moments of a step are those of its whole global batch: the loss reports them per micro-batch
(``posterior_moments``, in its aux) and the step averages the aux over micro-batches, which have equal
sizes, so a mesh or a micro-batch split changes them only by float rounding. They leave the aux
(``pop_moments``) before the metrics are written. A step whose loss is not finite leaves them as
they were, like the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from director_jax.build import LATENT_STATS_KEYS

DECAY = 0.99
AUX_KEYS = ("latent_mean", "latent_mean_sq")  # per-channel (z,) moments in the loss's aux: never metrics


class PosteriorTap:
    """The VAE as ``losses.vae_loss`` uses it (``encode``, ``decode``), keeping the posterior mean of ``video``.

    The loss reports that mean's moments without a second encoder pass. Only the encoding of the
    training clip itself counts (the loss may encode other inputs too, e.g. single frames).
    """

    def __init__(self, vae: Any, video: jax.Array):
        self._vae, self._video, self.posterior_mean = vae, video, None

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, logvar = self._vae.encode(video)
        if video is self._video and self.posterior_mean is None:
            self.posterior_mean = mean
        return mean, logvar

    def __getattr__(self, name: str) -> Any:  # decode, config and anything else: the VAE's own
        return getattr(self._vae, name)


def posterior_moments(mean: jax.Array) -> dict[str, jax.Array]:
    """The per-channel mean of ``mean`` (B, T, H, W, z) and of its square, float32, as the loss's aux entries."""
    mu = jax.lax.stop_gradient(mean).astype(jnp.float32)
    axes = tuple(range(mu.ndim - 1))
    return {AUX_KEYS[0]: jnp.mean(mu, axis=axes), AUX_KEYS[1]: jnp.mean(mu * mu, axis=axes)}


def with_posterior_moments(vae_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]], vae: Any,
                           video: jax.Array, *args: Any, **kw: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``vae_loss(vae, video, *args, **kw)`` with the moments of the posterior mean of ``video`` added to its aux."""
    tap = PosteriorTap(vae, video)
    loss, aux = vae_loss(tap, video, *args, **kw)
    if tap.posterior_mean is None:
        raise ValueError("the VAE loss did not encode its training clip through vae.encode; the latent statistics "
                         "need its posterior mean.")
    return loss, {**aux, **posterior_moments(tap.posterior_mean)}


def init_latent_stats(channels: int) -> dict[str, jax.Array]:
    """Empty statistics (weight 0: nothing seen yet)."""
    zeros = jnp.zeros((channels,), jnp.float32)
    return dict(zip(LATENT_STATS_KEYS, (zeros, zeros, jnp.zeros((), jnp.float32)), strict=True))


def pop_moments(aux: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(the aux without the moments, the moments): the moments are state, not metrics."""
    return ({k: v for k, v in aux.items() if k not in AUX_KEYS}, {k: aux[k] for k in AUX_KEYS if k in aux})


def update_latent_stats(stats: dict[str, jax.Array], moments: dict[str, jax.Array], decay: float = DECAY
                        ) -> dict[str, jax.Array]:
    """One EMA step: ``s <- decay * s + (1 - decay) * x`` for the mean, the mean square and the weight (x = 1)."""
    if set(moments) != set(AUX_KEYS):
        raise ValueError(f"the task keeps latent statistics but its loss reported {sorted(moments)}, not {AUX_KEYS}.")
    mean_key, sq_key, weight_key = LATENT_STATS_KEYS
    new = {mean_key: moments[AUX_KEYS[0]], sq_key: moments[AUX_KEYS[1]], weight_key: jnp.ones((), jnp.float32)}
    return {k: decay * stats[k] + (1.0 - decay) * new[k].astype(jnp.float32) for k in LATENT_STATS_KEYS}
