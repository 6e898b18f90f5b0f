"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping; EMA of the weights.

The EMA is kept beside the optimizer (not as an optax transform) because it averages parameters,
not updates, and because evaluation and export read it as a plain parameter tree.

Precision: ``optim.moment_dtype`` stores both Adam moments in that dtype (``None``: the parameter's
dtype, optax's own AdamW); the arithmetic is float32 either way, only the stored state is rounded.
``optim.ema_dtype`` is the EMA copy's dtype (``None``: the parameter's); ``optim.ema_memory="host"``
keeps it in the hosts' memory instead of the chips' (``EMA_MEMORY``; the host updates it each step from
a copy of the new weights: one weights-sized transfer to the host and the update's arithmetic on the host's
cores per step). With float32 parameters,
bfloat16 moments halve the optimizer state; the cost in loss is measured in ``benchmarks/RESULTS.md``
("Precision recipes", ``benchmarks/precision_curves.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.experimental.compute_on import compute_on

EMA_MEMORY = ("device", "host")  # where optim.ema_memory keeps the EMA: HBM, or the hosts' pinned memory


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


MOMENT_DTYPES = (None, "float32", "bfloat16")


def scale_by_adam_stored_as(dtype: jnp.dtype, *, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` with both moments stored in ``dtype`` and updated in float32.

    The state is optax's ``ScaleByAdamState`` (same tree as ``optax.adamw``'s), so checkpoints of either
    recipe have the same array names; only the moments' dtype differs.
    """

    def init(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params)
        return optax.ScaleByAdamState(count=jnp.zeros((), jnp.int32), mu=zeros, nu=jax.tree.map(jnp.copy, zeros))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1.0 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1.0 - b2) * jnp.square(f32(g)), updates, state.nu)
        mu_scale, nu_scale = 1.0 / (1.0 - b1 ** f32(count)), 1.0 / (1.0 - b2 ** f32(count))
        out = jax.tree.map(lambda g, m, v: (m * mu_scale / (jnp.sqrt(v * nu_scale) + eps)).astype(g.dtype),
                           updates, mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
        return out, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (``grad_clip`` <= 0 disables), then AdamW on the schedule above (moments stored
    in ``optim.moment_dtype``, see the module docstring)."""
    schedule = learning_rate_schedule(optim, total_steps)
    moment_dtype = optim.get("moment_dtype")
    if moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"optim.moment_dtype={moment_dtype!r}; choose one of {MOMENT_DTYPES}.")
    if moment_dtype is None:
        adamw = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                            weight_decay=float(optim.weight_decay))
    else:
        adamw = optax.chain(
            scale_by_adam_stored_as(jnp.dtype(moment_dtype), b1=float(optim.b1), b2=float(optim.b2),
                                    eps=float(optim.eps)),
            optax.add_decayed_weights(float(optim.weight_decay)), optax.scale_by_learning_rate(schedule))
    if float(optim.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), adamw)
    return adamw


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params``, leaf by leaf, computed in float32, stored in the EMA's dtype."""
    return jax.tree.map(lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)
                                      ).astype(e.dtype), ema, params)


def next_ema(ema, params, finite: jax.Array, decay: float, memory: str = "device"):
    """The step's new EMA: ``ema_update`` where the step is finite, else the old EMA unchanged.

    With ``memory="host"`` (the EMA in pinned host memory) the update runs on the host, beside the EMA,
    on the new weights copied out to it: HBM then holds no copy of the EMA at any point of the step
    (bringing the EMA in to update it on the chips would hold two, the old and the new)."""
    if memory == "device":
        return _kept_ema_update(ema, params, finite, decay)
    to_host = functools.partial(jax.device_put, device=jax.memory.Space.Host)
    return _host_ema_update(ema, to_host(params), to_host(finite), decay)


def _kept_ema_update(ema, params, finite: jax.Array, decay: float):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), ema_update(ema, params, decay), ema)


_host_ema_update = compute_on("device_host")(jax.jit(_kept_ema_update, static_argnums=(3,)))


def ema_copy(params, dtype: str | None):
    """The EMA's starting value: the parameters, in ``dtype`` (None: theirs)."""
    return jax.tree.map(lambda p: p.astype(p.dtype if dtype is None else jnp.dtype(dtype)), params)


def global_norm(tree) -> jax.Array:
    """The float32 global L2 norm of a tree (logged, and the finiteness check of the gradients)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
