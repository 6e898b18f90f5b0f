"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping; EMA of the weights.

The EMA is kept beside the optimizer (not as an optax transform) because it averages parameters,
not updates, and because evaluation and export read it as a plain parameter tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``learning_rate * end_lr_ratio``.

    The decay ends at ``optim.decay_steps`` (0 = the run's total steps). Warmup is capped at
    ``decay_steps - 1`` so a short smoke run still has a decay phase.
    """
    decay_steps = int(optim.decay_steps or total_steps)
    if decay_steps < 1:
        raise ValueError(f"optim.decay_steps (or train.steps) must be >= 1, got {decay_steps}.")
    warmup = min(int(optim.warmup_steps), decay_steps - 1)
    peak = float(optim.learning_rate)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, peak * float(optim.end_lr_ratio))


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip`` <= 0 disables), then AdamW on the schedule above."""
    adamw = optax.adamw(learning_rate_schedule(optim, total_steps), b1=float(optim.b1), b2=float(optim.b2),
                        eps=float(optim.eps), weight_decay=float(optim.weight_decay))
    if float(optim.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), adamw)
    return adamw


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params``, leaf by leaf, in the EMA's dtype (float32 master)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def global_norm(tree) -> jax.Array:
    """The float32 global L2 norm of a tree (logged, and the finiteness check of the gradients)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
