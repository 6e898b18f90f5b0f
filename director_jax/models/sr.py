"""Director-SR: the Wan DiT that upsamples a Director-Gen video over the same chunk layout.

The SR DiT is a ``WanDiT`` whose input is the noisy high-res latent concatenated on channels with
the latent of the low-res video upsampled to the high-res size (in_channels = 2 z, out_channels =
z). It runs over the timeline's chunk layout exactly as Director-Gen does: the high-res keyframe
latents sit clean (sigma 0) at the chunk starts and the MC-RoPE positions are the layout's, so the
keyframes anchor the detail (faces, text) that plain SR cannot restore.

* ``DirectorSR.from_gen`` starts SR training from a Gen (or any Wan T2V) DiT: every weight is
  copied and the patch embedding gains zero-initialised low-res channels, so at init the SR model
  is the Gen model (the low-res input has no effect until training gives it one).

Sampling (few steps, optionally over spatial tiles) is in ``pipeline/sr_sampling.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from director_jax.models.dit import NUM_TRAIN_TIMESTEPS, DirectorGen, WanDiT, WanDiTConfig


def sr_config(gen_config: WanDiTConfig) -> WanDiTConfig:
    """The SR DiT's config for a Gen DiT's: twice the input channels (noisy + low-res latents)."""
    if gen_config.in_channels != gen_config.out_channels:
        raise ValueError(f"a Gen DiT maps latents to velocities of the same size; this config has in_channels "
                         f"{gen_config.in_channels} != out_channels {gen_config.out_channels}. Is it already an SR "
                         "config?")
    return dataclasses.replace(gen_config, in_channels=2 * gen_config.in_channels)


class DirectorSR(nnx.Module):
    """Director-SR: ``sr(noisy_latents, lowres_latents, sigma_frames, text, positions=...) -> velocity``.

    ``noisy_latents`` (B, L, h, w, z) are the normalized high-res chunk latents in ``TimelineLayout``
    order, noised per latent frame; the given (keyframe / video) frames hold their clean latents,
    with sigma 0 in ``sigma_frames`` (B, L), exactly as for ``DirectorGen``. ``lowres_latents``
    (B, L, h, w, z) are the latents of the low-res video upsampled to the high-res size and encoded
    over the same layout, so they lie on the same grid. ``positions`` (L,) or (B, L) are the MC-RoPE
    positions (``TimelineLayout.position``). Returns the velocity (B, L, h, w, z) for every frame.
    """

    def __init__(self, dit: WanDiT):
        cfg = dit.config
        if cfg.in_channels != 2 * cfg.out_channels:
            raise ValueError(f"an SR DiT takes the noisy and the low-res latents on channels, so in_channels must be "
                             f"2 * out_channels; got in_channels {cfg.in_channels}, out_channels {cfg.out_channels}. "
                             "Build it with sr_config(gen_config) or DirectorSR.from_gen(gen).")
        self.dit = dit

    @property
    def config(self) -> WanDiTConfig:
        return self.dit.config

    @property
    def latent_channels(self) -> int:
        return self.dit.config.out_channels

    @classmethod
    def init(cls, gen_config: WanDiTConfig, *, rngs: nnx.Rngs, **model_kw: Any) -> DirectorSR:
        """A randomly initialised SR model for a Gen architecture (``model_kw`` go to ``WanDiT``)."""
        return cls(WanDiT(sr_config(gen_config), rngs=rngs, **model_kw))

    @classmethod
    def from_gen(cls, gen: DirectorGen | WanDiT) -> DirectorSR:
        """An SR model that starts as ``gen``: all weights copied, the low-res input channels zero.

        The patch embedding kernel (pt, ph, pw, z, D) becomes (pt, ph, pw, 2z, D) with the Gen
        kernel on the first z channels (the noisy latents) and zeros on the low-res ones, so the
        output equals the Gen model's on the noisy latents whatever the low-res latents are. The
        other modules (and their dtype, attention and remat settings) are copies of ``gen``'s;
        ``gen`` itself is left unchanged.
        """
        dit = gen.dit if isinstance(gen, DirectorGen) else gen
        if not isinstance(dit, WanDiT):
            raise TypeError(f"from_gen takes a DirectorGen or a WanDiT, got {type(gen).__name__}.")
        config = sr_config(dit.config)  # checks that gen is a Gen (in == out channels) DiT
        sr_dit = nnx.clone(dit)
        kernel = sr_dit.patch_embedding.kernel
        value = kernel.get_value()
        kernel.set_value(jnp.concatenate([value, jnp.zeros_like(value)], axis=3))
        sr_dit.config = config
        return cls(sr_dit)

    def check_inputs(self, noisy_latents: jax.Array, lowres_latents: jax.Array) -> None:
        """Clear errors for latents that do not fit each other or the model."""
        z = self.latent_channels
        if noisy_latents.ndim != 5 or noisy_latents.shape[-1] != z:
            raise ValueError(f"noisy_latents must be (B, L, h, w, {z}) channels-last; got {noisy_latents.shape}.")
        if lowres_latents.ndim != 5 or lowres_latents.shape[-1] != z:
            raise ValueError(f"lowres_latents must be (B, L, h, w, {z}) channels-last; got {lowres_latents.shape}.")
        if lowres_latents.shape != noisy_latents.shape:
            raise ValueError(f"lowres_latents {lowres_latents.shape} and noisy_latents {noisy_latents.shape} differ: "
                             "the low-res video must be upsampled to the high-res size and encoded over the same "
                             "timeline layout, so both lie on one (B, L, h, w) latent grid.")

    def __call__(self, noisy_latents: jax.Array, lowres_latents: jax.Array, sigma_frames: jax.Array, text: jax.Array,
                 *, positions: jax.Array, text_mask: jax.Array | None = None,
                 valid_frames: jax.Array | None = None) -> jax.Array:
        self.check_inputs(noisy_latents, lowres_latents)
        sigma_frames = jnp.asarray(sigma_frames, jnp.float32)
        if sigma_frames.shape != noisy_latents.shape[:2]:
            raise ValueError(f"sigma_frames has shape {sigma_frames.shape}; it needs one flow time per latent frame, "
                             f"shape {noisy_latents.shape[:2]}.")
        x = jnp.concatenate([noisy_latents, lowres_latents.astype(noisy_latents.dtype)], axis=-1)
        return self.dit(x, NUM_TRAIN_TIMESTEPS * sigma_frames, text, positions=positions, text_mask=text_mask,
                        valid_frames=valid_frames)
