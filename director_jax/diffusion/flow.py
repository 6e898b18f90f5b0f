"""Rectified flow: the noising path, the velocity target and the loss on generated tokens only.

The path is the straight line ``x_t = (1 - t) x0 + t eps`` from the clean latents (t = 0) to
Gaussian noise (t = 1), as in SD3 / Wan; the model predicts its velocity ``dx_t/dt = eps - x0``.
In Director-Gen a sequence mixes *given* latent frames (clean keyframe / conditioning latents, held
at t = 0) with *generated* ones, so ``t`` may be per latent frame, and the loss counts generated
frames only: the given frames are inputs, not predictions (docs/design.md, "The method").

Shapes: latents ``(B, T', h, w, C)``; a time ``t`` is ``(B,)`` (one per sample) or ``(B, T')``
(one per latent frame) and is broadcast over the trailing axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _broadcast_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """``t`` of shape (B,) or (B, T') with trailing unit axes so that it broadcasts against ``x``."""
    t = jnp.asarray(t)
    if t.ndim == 0 or t.ndim > x.ndim or t.shape != x.shape[: t.ndim]:
        raise ValueError(
            f"t has shape {t.shape} but the latents have shape {x.shape}: give one time per sample "
            f"{x.shape[:1]} or one per latent frame {x.shape[:2]}."
        )
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def noisy_latents(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x0 + t noise``, computed in float32 and returned in ``x0``'s dtype.

    A frame with ``t = 0`` is returned exactly clean, which is how given frames stay clean.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {noise.shape} but x0 has shape {x0.shape}: they must match.")
    t = _broadcast_time(t, x0).astype(jnp.float32)
    x_t = (1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)
    return x_t.astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The flow-matching regression target ``noise - x0`` (the velocity of the straight path)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {noise.shape} but x0 has shape {x0.shape}: they must match.")
    return noise.astype(jnp.float32) - x0.astype(jnp.float32)


def flow_matching_loss(pred: jax.Array, target: jax.Array, generated_mask: jax.Array,
                       weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error of the predicted velocity over generated latent frames only.

    ``pred`` / ``target``: ``(B, T', ...)``; ``generated_mask``: bool ``(B, T')``, True where the
    frame is generated (noised); given frames count in neither numerator nor denominator, so the
    model's output there is ignored. ``weights``: optional per-sample ``(B,)`` or per-frame
    ``(B, T')`` loss weights (e.g. a timestep weighting), applied to the numerator only.

    Each sample's loss is its weighted squared error averaged over its generated frames and their
    elements; the result is the mean over samples that have at least one generated frame (every
    sample counts equally, however many keyframes it has). A sample with no generated frame (all
    given) contributes nothing and is left out of the mean; a batch with none at all gives 0.
    The reduction runs in float32 whatever the input dtype.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}: they must match.")
    if pred.ndim < 2 or generated_mask.shape != pred.shape[:2]:
        raise ValueError(
            f"generated_mask has shape {generated_mask.shape} but the latents have shape {pred.shape}: "
            f"give one bool per latent frame, shape {pred.shape[:2]}."
        )
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_frame = jnp.mean(err, axis=tuple(range(2, err.ndim))) if err.ndim > 2 else err  # (B, T')
    mask = generated_mask.astype(jnp.float32)
    if weights is not None:
        weights = jnp.asarray(weights, jnp.float32)
        if weights.shape not in (pred.shape[:1], pred.shape[:2]):
            raise ValueError(
                f"weights has shape {weights.shape}: give one weight per sample {pred.shape[:1]} or per "
                f"latent frame {pred.shape[:2]}."
            )
        per_frame = per_frame * weights.reshape(weights.shape + (1,) * (2 - weights.ndim))
    frames = jnp.sum(mask, axis=1)  # (B,)
    per_sample = jnp.sum(per_frame * mask, axis=1) / jnp.maximum(frames, 1.0)
    valid = (frames > 0).astype(jnp.float32)
    return jnp.sum(per_sample * valid) / jnp.maximum(jnp.sum(valid), 1.0)
