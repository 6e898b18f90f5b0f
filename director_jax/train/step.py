"""The train step: gradient accumulation over micro-batches, one AdamW update, EMA, non-finite guard.

``make_train_step`` returns the pure step ``(state, frozen, batch) -> (state, metrics)``;
``jit_train_step`` wraps it with explicit in/out shardings and donates the old state, so the
update happens in place on every device.

Micro-batches: the global batch (B, ...) is split into ``m`` micro-batches of B/m rows, micro-batch
j holding rows j, j + m, j + 2m, ... . With the batch dim sharded in contiguous blocks over the
devices, every device keeps its own rows in every micro-batch (no data moves), and the loss is the
mean of the micro-batch means, whatever the mesh. A step whose loss or gradient norm is not finite
leaves parameters, optimizer state, EMA and latent statistics untouched and counts a skip; the caller
decides whether that stops the run. A task that keeps latent statistics (the VAE) reports its
batch's moments in the loss's aux; they go into the state (``latent_stats.py``), not the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from director_jax.parallel import axis_rules, constrain, current_rules, logical_to_mesh_spec, validate_rules
from director_jax.parallel.rules import Rules
from director_jax.train.latent_stats import DECAY as LATENT_STATS_DECAY
from director_jax.train.latent_stats import pop_moments, update_latent_stats
from director_jax.train.optim import global_norm, next_ema
from director_jax.train.state import TrainState
from director_jax.train.tasks import BatchField, Task

StepFn = Callable[[TrainState, Any, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def split_micro_batches(x: jax.Array, micro_batches: int, logical: tuple[str | None, ...]) -> jax.Array:
    """(B, ...) -> (m, B/m, ...) with micro-batch j = rows j, j + m, ... (see the module docstring)."""
    b = x.shape[0]
    if b % micro_batches:
        raise ValueError(f"batch of {b} rows does not split into {micro_batches} micro-batches.")
    x = x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, *logical))


def make_train_step(task: Task, graphdef: nnx.GraphDef, frozen_graphdef: nnx.GraphDef | None,
                    tx: optax.GradientTransformation, *, micro_batches: int, ema_decay: float,
                    schedule: optax.Schedule | None = None, latent_stats_decay: float = LATENT_STATS_DECAY,
                    ema_memory: str = "device") -> StepFn:
    """The pure train step for ``task`` (trace it under a mesh and ``axis_rules`` for activation constraints);
    ``ema_memory``: where the state's EMA lives ("host": its shardings' memory kind is pinned_host)."""
    fields = task.batch_fields(1)

    def micro_loss(params, frozen, batch, key):
        model = nnx.merge(graphdef, params)
        frozen_model = None if frozen_graphdef is None else nnx.merge(frozen_graphdef, frozen)
        return task.loss(model, frozen_model, batch, key)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        # One key per example (fold_in of its row index): its noise does not depend on the micro-batch split.
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        rows = next(iter(batch.values())).shape[0]
        keys = jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(rows)))
        keys = constrain(keys, ("batch", None))
        if micro_batches == 1:
            (loss, aux), grads = grad_fn(state.params, frozen, batch, jax.random.wrap_key_data(keys))
        else:
            micro = {k: split_micro_batches(v, micro_batches, fields[k].logical) for k, v in batch.items()}
            micro_keys = split_micro_batches(keys, micro_batches, ("batch", None))

            def body(carry, xs):
                grads_sum, loss_sum, aux_sum = carry
                mb, k = xs
                mb = {name: constrain(v, fields[name].logical) for name, v in mb.items()}
                (loss, aux), grads = grad_fn(state.params, frozen, mb, jax.random.wrap_key_data(k))
                add = lambda a, b: a + b  # noqa: E731
                return (jax.tree.map(add, grads_sum, grads), loss_sum + loss, jax.tree.map(add, aux_sum, aux)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = (jax.tree.map(lambda v: v[0], micro), jax.random.wrap_key_data(micro_keys[0]))
            aux_zeros = jax.eval_shape(lambda: grad_fn(state.params, frozen, *first)[0][1])
            aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_zeros)
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux_zeros),
                                                 (micro, micro_keys))
            scale = 1.0 / micro_batches
            grads = jax.tree.map(lambda g: g * scale, grads)
            loss = loss * scale
            aux = jax.tree.map(lambda a: a * scale, aux)

        aux, moments = pop_moments(aux)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        ema = None if state.ema is None else next_ema(state.ema, params, finite, ema_decay, ema_memory)
        stats = state.latent_stats
        if stats is not None:
            stats = keep(update_latent_stats(stats, moments, latent_stats_decay), stats)
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            ema=ema,
            nonfinite_skips=state.nonfinite_skips + jnp.where(finite, 0, 1).astype(jnp.int32),
            latent_stats=stats,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return new_state, metrics

    return step


def batch_shardings(fields: dict[str, BatchField], mesh: Mesh, rules: Rules | None = None
                    ) -> dict[str, NamedSharding]:
    """Shardings of a global batch by its fields' logical names (default table: the batch dim over
    ("data", "fsdp") where it divides); ``rules`` defaults to the active table."""
    return {k: NamedSharding(mesh, logical_to_mesh_spec(f.logical, rules, mesh=mesh, shape=f.shape))
            for k, f in fields.items()}


def jit_train_step(step: StepFn, mesh: Mesh, state_sharding: TrainState, frozen_sharding: Any,
                   batch_sharding: dict[str, NamedSharding], rules: Rules | None = None):
    """``jax.jit`` of the step with explicit shardings; the incoming state is donated.

    The step is traced under ``mesh`` and ``rules`` (default: the table active now), so activation
    constraints follow the same table as the shardings, wherever the step is lowered.
    """
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    table = current_rules() if rules is None else validate_rules(rules)

    def traced(state, frozen, batch):
        # activation constraints see the mesh and the rules table
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(table):
            return step(state, frozen, batch)

    return jax.jit(traced, in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=(0,))
