"""Training timesteps: logit-normal or uniform draws, moved towards noise by a (resolution) shift.

Large latents keep more signal at a given noise level (many tokens average the noise out), so
flow models train and sample with times pushed towards t = 1 by the SD3 / Wan *shift*
``t -> s t / (1 + (s - 1) t)``. SD3 and Flux tie the shift to the token count: ``mu`` is linear in
the number of tokens and ``s = exp(mu)`` (diffusers' ``calculate_shift`` plus the scheduler's
exponential ``time_shift``, which is the same map as above with ``s = exp(mu)``). Wan uses a fixed
shift per resolution instead (3.0 at 480p, 5.0 at 720p in its diffusers pipelines).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

T_EPS = 1e-5  # sampled times are clipped to [T_EPS, 1 - T_EPS]: t = 0 and t = 1 are degenerate targets


def shift_sigmas(t, shift: float):
    """The SD3 / Wan time shift ``s t / (1 + (s - 1) t)``; maps [0, 1] onto itself, s > 1 moves towards 1.

    Works on Python floats, NumPy and JAX arrays alike (it is also used to build sampler tables).
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 means no shift), got {shift}.")
    return shift * t / (1 + (shift - 1) * t)


def resolution_mu(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """``mu`` linear in the token count: ``base_shift`` at ``base_tokens``, ``max_shift`` at ``max_tokens``.

    Equal to diffusers' ``calculate_shift`` (``diffusers.pipelines.flux.pipeline_flux``), which the
    Flux / SD3 pipelines pass to the scheduler as ``mu``. The line is extrapolated outside the two
    anchors, so for video token counts (tens of thousands) pick anchors that fit the model.
    """
    if max_tokens == base_tokens:
        raise ValueError(f"base_tokens and max_tokens are both {base_tokens}: the line needs two distinct anchors.")
    m = (max_shift - base_shift) / (max_tokens - base_tokens)
    b = base_shift - m * base_tokens
    return num_tokens * m + b


def resolution_shift(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """The shift ``s = exp(mu)`` for ``num_tokens`` DiT tokens (after patchify), ``mu = resolution_mu(...)``.

    ``shift_sigmas(t, resolution_shift(n))`` equals diffusers' exponential ``time_shift(mu, 1, t)``.
    """
    return math.exp(resolution_mu(num_tokens, base_tokens, max_tokens, base_shift, max_shift))


def sample_timesteps(key: jax.Array, batch: int | tuple[int, ...], *,
                     kind: Literal["logit_normal", "uniform"] = "logit_normal", mean: float = 0.0, std: float = 1.0,
                     shift: float = 1.0) -> jax.Array:
    """Training times in (0, 1), float32, shape ``batch`` (an int for (B,), or a tuple such as (B, T')).

    ``logit_normal``: ``sigmoid(mean + std * N(0, 1))`` (SD3's default, median ``sigmoid(mean)``);
    ``uniform``: U(0, 1). Then shifted with ``shift_sigmas(t, shift)`` and clipped to
    ``[T_EPS, 1 - T_EPS]``. jit-safe (``batch``, ``kind`` and ``shift`` are static Python values).
    """
    shape = (batch,) if isinstance(batch, int) else tuple(batch)
    if kind == "logit_normal":
        if not std > 0:
            raise ValueError(f"the logit-normal std must be > 0, got {std}.")
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, jnp.float32))
    elif kind == "uniform":
        t = jax.random.uniform(key, shape, jnp.float32)
    else:
        raise ValueError(f"unknown timestep distribution {kind!r}: use 'logit_normal' or 'uniform'.")
    if shift != 1.0:
        t = shift_sigmas(t, shift)
    return jnp.clip(t, T_EPS, 1.0 - T_EPS)
