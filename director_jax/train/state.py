"""The train state (parameters, optimizer state, EMA, step, RNG, skip count) and its shardings.

The state is built by one traceable ``init`` function: ``jax.eval_shape`` of it gives the abstract
state (shapes for the AOT compile and for restoring a checkpoint onto any mesh), and the same
function under ``jax.jit(out_shardings=...)`` creates every array directly in its shards.
Optimizer and EMA leaves take the sharding of the parameter they mirror; everything else is
replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from director_jax.parallel import DEFAULT_RULES, param_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState
    ema: nnx.State | None  # EMA of params (None when optim.ema_decay == 0)
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)
    nonfinite_skips: jax.Array  # int32 scalar: updates skipped because the loss or gradients were not finite


def init_fn(build_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
            use_ema: bool) -> Callable[[], TrainState]:
    """A traceable function creating the whole train state from scratch."""

    def init() -> TrainState:
        params = nnx.state(build_fn(), nnx.Param)
        ema = jax.tree.map(jnp.copy, params) if use_ema else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=ema,
                          rng=jax.random.key_data(jax.random.key(seed)), nonfinite_skips=jnp.zeros((), jnp.int32))

    return init


def model_graphdef(build_fn: Callable[[], nnx.Module]) -> nnx.GraphDef:
    """The static structure of the model (no arrays are allocated)."""
    graphdef, _, rest = nnx.split(nnx.eval_shape(build_fn), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state (RNG streams or statistics); the trainer keeps only "
                         "nnx.Param state, so build the model without such variables.")
    return graphdef


def path_parts(path: tuple) -> tuple[str, ...]:
    """A pytree key path as names: ``("params", "dit", "blocks", "ffn", "proj_in", "kernel")``.

    The ``value`` attribute of an ``nnx.Variable`` is left out, so a parameter and the optimizer /
    EMA leaves that mirror it end with the same names.
    """
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return tuple(parts)


def state_shardings(abstract: TrainState, mesh: Mesh, rules=DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of the (abstract) train state on ``mesh``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sharding = param_shardings(abstract.params, mesh, rules)
    by_path = {}
    for (path, leaf), (_, sharding) in zip(jax.tree_util.tree_leaves_with_path(abstract.params),
                                           jax.tree_util.tree_leaves_with_path(params_sharding), strict=True):
        by_path[path_parts(path)] = (leaf.shape, sharding)

    def mirror(path, leaf):
        key = path_parts(path)
        for start in range(len(key)):  # the longest suffix that names a parameter of the same shape
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    opt_sharding = jax.tree_util.tree_map_with_path(mirror, abstract.opt_state)
    return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                      ema=None if abstract.ema is None else params_sharding, rng=replicated,
                      nonfinite_skips=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (targets for restore and AOT lowering).

    ``shardings`` may stop at ``nnx.Variable`` nodes (as ``param_shardings`` makes them): it is
    used as a prefix of ``abstract``.
    """

    def place(sharding, sub):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), sub)

    return jax.tree.map(place, shardings, abstract)
