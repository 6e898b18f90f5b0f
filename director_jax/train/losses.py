"""Training objectives. The VAE's: L1 reconstruction plus a small KL to the unit Gaussian."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from director_jax.models.vae import WanVAE, kl_divergence, sample_posterior


def vae_loss(vae: WanVAE, video: jax.Array, key: jax.Array, kl_weight: float = 1e-6, sample: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean absolute error of the reconstruction, plus ``kl_weight`` * KL.

    ``sample=True`` decodes a posterior sample (the VAE recipe); ``sample=False`` decodes the
    posterior mean, which converges much faster from scratch (short CPU fits) and matches how a
    frozen VAE is used downstream (the DiT is trained on posterior means or samples near them).
    The KL is summed over latent elements and averaged over the batch, so ``kl_weight`` is
    comparable with Wan / Stable Diffusion VAE recipes.
    """
    mean, logvar = vae.encode(video)
    z = sample_posterior(mean, logvar, key) if sample else mean
    recon = vae.decode(z, clip=False)
    l1 = jnp.mean(jnp.abs(recon - video))
    kl = jnp.mean(kl_divergence(mean, logvar))
    return l1 + kl_weight * kl, {"l1": l1, "kl": kl}
