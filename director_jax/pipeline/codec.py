"""The VAE's encode and decode jitted once per VAE structure: every inference path calls these two."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from director_jax.models.vae import WanVAE


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    return nnx.merge(graphdef, state).encode(video)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state).decode(latents)


Encode = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # (B, T, H, W, 3) -> posterior (mean, logvar)
Decode = Callable[[jax.Array], jax.Array]  # raw latents -> (B, T, H, W, 3)


def jitted_codec(vae: WanVAE) -> tuple[Encode, Decode]:
    """``(encode, decode)`` of ``vae`` jitted: compiled once per VAE structure and input shape, reused across calls
    and across VAEs of one structure (the weights are an argument, not a constant)."""
    graphdef, state = nnx.split(vae)
    return functools.partial(_encode, graphdef, state), functools.partial(_decode, graphdef, state)
