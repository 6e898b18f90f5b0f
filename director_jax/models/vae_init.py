"""Initialisations of the Wan VAE that a short fit from scratch needs (the CPU tiny configs, the demo, benchmarks).

``vae_init`` in a VAE run's config names them: ``kernel_scale`` (every conv kernel multiplied, so
Adam's relative steps are not huge at PyTorch's default scale) and ``inflate`` (temporal taps start
as "this frame only": an image VAE, inflated, as Wan's VAE was trained).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from director_jax.models.vae import WanVAE
from director_jax.models.vae_blocks import CausalConv3d, Resample


def scale_conv_kernels(vae: WanVAE, factor: float) -> None:
    """Multiplies every kernel of ``vae`` by ``factor`` in place.

    Every conv of the Wan VAE feeds an RMS norm, so its output ignores the kernel's scale and Adam's
    relative step is ``lr / |kernel|``: from PyTorch's default init (|kernel| ~ 0.01) the decoder
    collapsed to a constant at lr >= 1e-3 and crawled below it; kernels 8x larger train at 1.5e-3.
    """
    for _, module in nnx.iter_graph(vae):
        if isinstance(getattr(module, "kernel", None), nnx.Param):
            module.kernel.set_value(factor * module.kernel.get_value())


def inflate_temporal_kernels(vae: WanVAE) -> None:
    """Makes every temporal tap of ``vae`` start as "this frame only", in place (an image VAE, inflated).

    From random 3D kernels a short fit learns codes in which each 4-frame latent depends on the
    chunk's history: consecutive latents of a nearly static clip came out less alike than two
    random latents (their squared difference 0.97 vs variance 1.07), and variance grew along the
    chunk, which leaves Director-Gen nothing to copy from its keyframes. Wan's VAE starts from an
    image VAE instead; this does the same at initialization: the causal convolutions keep only
    their last (current-frame) tap, the temporal downsampling passes the newest frame of each pair
    through and the temporal upsampling repeats each frame, so a static clip has equal latents.
    Call after ``scale_conv_kernels`` (the identity taps stay at 1).
    """
    time_convs = {id(m.time_conv) for _, m in nnx.iter_graph(vae) if isinstance(m, Resample) and m.time_conv}
    for _, module in nnx.iter_graph(vae):
        if not isinstance(module, CausalConv3d) or module.kernel.shape[0] == 1:
            continue
        kernel = jnp.asarray(module.kernel.get_value())
        kt, kh, kw, c_in, c_out = kernel.shape
        if id(module) in time_convs:  # (kt, 1, 1, C, C) downsampling or (kt, 1, 1, C, 2C) upsampling
            eye = jnp.eye(c_in, dtype=kernel.dtype)
            tap = jnp.concatenate([eye] * (c_out // c_in), axis=1)[None, None]
            kernel = jnp.zeros_like(kernel).at[-1].set(tap)
            module.bias.set_value(jnp.zeros_like(module.bias.get_value()))
        else:
            kernel = jnp.zeros_like(kernel).at[-1].set(kernel[-1])
        module.kernel.set_value(kernel)


def initialise_for_fit(vae: WanVAE, *, kernel_scale: float = 1.0, inflate: bool = False) -> WanVAE:
    """``scale_conv_kernels`` then (optionally) ``inflate_temporal_kernels``, in place; returns ``vae``."""
    if kernel_scale != 1.0:
        scale_conv_kernels(vae, kernel_scale)
    if inflate:
        inflate_temporal_kernels(vae)
    return vae
