"""The train state (parameters, optimizer state, EMA, step, RNG, skip count, a VAE run's latent statistics) and
its shardings.

The state is built by one traceable ``init`` function: ``jax.eval_shape`` of it gives the abstract
state (shapes for the AOT compile and for restoring a checkpoint onto any mesh), and the same
function under ``jax.jit(out_shardings=...)`` creates every array directly in its shards. A model's
``init_from`` is never read inside the trace: ``create_state`` reads it into the shards first.
Optimizer and EMA leaves take the sharding of the parameter they mirror; everything else is
replicated. ``latent_stats`` exists only for tasks that keep them (the VAE: ``latent_stats.py``), so
other runs' checkpoints hold exactly the arrays they always held.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from director_jax.build import flatten_state, path_parts, unflatten_state
from director_jax.build.shard_init import InitRequest, deferred_init_from, host_reader, load_into_shards
from director_jax.parallel import axis_rules, current_rules, param_shardings, validate_rules
from director_jax.parallel.rules import Rules
from director_jax.train.latent_stats import init_latent_stats
from director_jax.train.optim import ema_copy


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: nnx.State  # the master weights (model_options.param_dtype; float32 by default)
    opt_state: optax.OptState
    ema: nnx.State | None  # EMA of params in optim.ema_dtype (None when optim.ema_decay == 0)
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)
    nonfinite_skips: jax.Array  # int32 scalar: updates skipped because the loss or gradients were not finite
    # VAE runs: EMA sums of the posterior mean's per-channel moments (train/latent_stats.py); None otherwise
    latent_stats: dict[str, jax.Array] | None = None


class Init:
    """The traceable function creating the whole train state from scratch (``init_fn``).

    ``config.init_from`` is never read while it is traced: the model is built as the architecture
    (``build.shard_init.deferred_init_from``), so ``jax.eval_shape`` of it reads nothing. Called under
    ``jax.jit`` it fills the parameters from ``init_from`` through run-time host callbacks (whole
    arrays: small models, tests); the trainer uses ``create_state``, which reads each parameter
    straight into its shards and calls ``from_params``.
    """

    def __init__(self, build_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
                 use_ema: bool, table: Rules, latent_channels: int | None, ema_dtype: str | None = None):
        self.build_fn, self.tx, self.seed, self.use_ema, self.ema_dtype = build_fn, tx, seed, use_ema, ema_dtype
        self.table, self.latent_channels = table, latent_channels

    def _build(self, build: Callable[[Callable[[], nnx.Module]], nnx.Module]
               ) -> tuple[nnx.State, InitRequest | None]:
        with axis_rules(self.table), deferred_init_from() as pending:
            params = nnx.state(build(self.build_fn), nnx.Param)
        return params, (pending[0] if pending else None)

    def request(self) -> InitRequest | None:
        """What the model's ``init_from`` asks to load (None: a random init); reads no weights."""
        return self._build(nnx.eval_shape)[1]

    def __call__(self) -> TrainState:
        params, request = self._build(lambda build: build())
        if request is not None:
            targets = flatten_state(params)
            whole = host_reader(request, targets)
            flat = {n: jax.pure_callback(functools.partial(whole, n), jax.ShapeDtypeStruct(t.shape, t.dtype))
                    for n, t in targets.items()}
            params = unflatten_state(params, flat)
        return self.from_params(params)

    def from_params(self, params: nnx.State) -> TrainState:
        """The fresh train state around ``params`` (traceable): step 0, a new optimizer state, EMA = params."""
        ema = ema_copy(params, self.ema_dtype) if self.use_ema else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema=ema,
                          rng=jax.random.key_data(jax.random.key(self.seed)),
                          nonfinite_skips=jnp.zeros((), jnp.int32),
                          latent_stats=None if self.latent_channels is None
                          else init_latent_stats(self.latent_channels))


def init_fn(build_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, *, seed: int,
            use_ema: bool, rules: Rules | None = None, latent_channels: int | None = None,
            ema_dtype: str | None = None) -> Init:
    """A traceable function creating the whole train state from scratch (``Init``).

    ``rules`` (default: the table active now) is the logical-axis table active while it is traced;
    ``latent_channels``: keep latent statistics over that many channels (the VAE task), None: none;
    ``ema_dtype``: the EMA copy's dtype (None: the parameters').
    """
    table = current_rules() if rules is None else validate_rules(rules)
    return Init(build_fn, tx, seed=seed, use_ema=use_ema, table=table, latent_channels=latent_channels,
                ema_dtype=ema_dtype)


def create_state(init: Callable[[], TrainState], shardings: TrainState) -> TrainState:
    """A new run's train state in its shardings; an ``init_from`` is read per shard, outside any trace.

    Without one (or for a plain init function) it is ``jax.jit(init, out_shardings=shardings)()``.
    With one, each host reads only the slices of the checkpoint its devices hold
    (``build.shard_init.load_into_shards``), and the rest of the state is made around them.
    """
    request = init.request() if isinstance(init, Init) else None
    if request is None:
        return jax.jit(init, out_shardings=shardings)()
    abstract = jax.eval_shape(init)
    targets = flatten_state(with_shardings(abstract.params, shardings.params))
    params = unflatten_state(abstract.params, load_into_shards(request, targets))
    return jax.jit(init.from_params, out_shardings=shardings, donate_argnums=0)(params)


def model_graphdef(build_fn: Callable[[], nnx.Module]) -> nnx.GraphDef:
    """The static structure of the model (no arrays are allocated, no ``init_from`` is read)."""
    with deferred_init_from():
        graphdef, _, rest = nnx.split(nnx.eval_shape(build_fn), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model holds non-parameter state (RNG streams or statistics); the trainer keeps only "
                         "nnx.Param state, so build the model without such variables.")
    return graphdef


def state_shardings(abstract: TrainState, mesh: Mesh, rules: Rules | None = None, ema_memory: str = "device"
                    ) -> TrainState:
    """NamedShardings for every leaf of the (abstract) train state on ``mesh`` (``rules``: default the active table);
    the EMA's as the parameters', in the hosts' pinned memory when ``ema_memory`` is "host"."""
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
    ema_sharding = params_sharding
    if ema_memory == "host":
        ema_sharding = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), params_sharding)
    return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                      ema=None if abstract.ema is None else ema_sharding, rng=replicated,
                      nonfinite_skips=replicated,
                      latent_stats=jax.tree.map(lambda _: replicated, abstract.latent_stats))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (targets for restore and AOT lowering).

    ``shardings`` may stop at ``nnx.Variable`` nodes (as ``param_shardings`` makes them): it is
    used as a prefix of ``abstract``.
    """

    def place(sharding, sub):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), sub)

    return jax.tree.map(place, shardings, abstract)
