"""Logical axis names -> mesh axes: the one rules table, partition specs, sharded init, constraints.

Every parameter carries logical axis names in its ``out_sharding`` metadata (see
``director_jax.models.layers.param``); activations are annotated with ``constrain``. ``DEFAULT_RULES``
maps each name to mesh axes (``None`` = replicated, a name, or a tuple of names sharded jointly):

* parameters: FSDP on the model width ("embed", over the fsdp and sequence axes: with sequence
  parallelism and batch 1 the sequence chips would otherwise each hold the whole model), tensor
  parallelism on "heads", "mlp", the second width of square projections ("embed_out"), the
  text-feature width and the vocabulary; the scanned "layers" axis is never sharded;
* activations: "batch" over ("data", "fsdp"), "length"/"sequence" over "sequence", per-head and MLP
  hidden activations over "tensor", the activation width replicated.

Two fallbacks keep any model shardable on any mesh (MaxText-style):

* a mesh axis appears at most once in a spec: a later dim whose axes are already used falls back to
  the remaining ones (or to replicated);
* with a mesh and a shape known, a mesh axis of size 1 is dropped, and a dim keeps its axes in order
  only while their running product divides the dim size; the rest are dropped (``("data", "fsdp")``
  on a batch of 2 with data=2, fsdp=4 gives "data"; a 42-wide dim on tensor=4 is replicated).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
M = TypeVar("M", bound=nnx.Module)

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameters
    ("embed", ("fsdp", "sequence")),  # ZeRO-3 over the sequence-parallel chips too (else they hold full copies)
    ("embed_out", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("text_embed", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("sequence", "sequence"),
    ("text_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("frames", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _axis_sizes(mesh: Any) -> Mapping[str, int] | None:
    if mesh is None or getattr(mesh, "empty", False):
        return None
    return dict(mesh.shape)


def logical_to_mesh_spec(logical_names: Sequence[str | None], rules: Rules = DEFAULT_RULES, *,
                         mesh: Mesh | Any | None = None, shape: Sequence[int] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` for a tensor whose dims carry ``logical_names`` (``None`` = replicated).

    Each mesh axis is used at most once. With ``mesh`` (a ``Mesh`` or ``AbstractMesh``) mesh axes of
    size 1 are dropped; with ``shape`` too, a dim keeps its mesh axes only while their product
    divides it (see the module docstring). Unknown logical names raise: add them to the table.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(logical_names):
        raise ValueError(f"Logical names {tuple(logical_names)} do not match the rank of shape {tuple(shape)}.")
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for i, name in enumerate(logical_names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"Logical axis {name!r} has no sharding rule; known: {sorted(table)}.")
        kept: list[str] = []
        product = 1
        for axis in _as_tuple(table[name]):
            if axis in used:
                continue
            if sizes is not None:
                if axis not in sizes:
                    raise ValueError(f"Rule {name!r} -> {axis!r}: the mesh has no axis {axis!r} ({tuple(sizes)}).")
                if sizes[axis] == 1:
                    continue
                if shape is not None and shape[i] % (product * sizes[axis]):
                    break
                product *= sizes[axis]
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A state of ``NamedSharding`` (one per variable) from each ``nnx.Param``'s ``out_sharding`` names.

    Takes a module or a (possibly abstract) state; parameters without names and non-parameter
    variables (RNG keys, counters, batch statistics) are replicated.
    """
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def sharding(variable: nnx.Variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Param) else None
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        shape = variable.get_value().shape
        return NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh=mesh, shape=shape))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def sharded_init(build_fn: Callable[[], M], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> M:
    """Builds ``build_fn()`` with every parameter created directly in its shards (never a full copy).

    ``nnx.eval_shape`` gives the abstract model, ``param_shardings`` its shardings, and the build runs
    under ``jax.jit(..., out_shardings=...)``. ``build_fn`` must make its own ``nnx.Rngs`` (no state
    captured from outside the trace). Random initialisers run as traced JAX ops here, so values match
    another jitted build from the same seed (whatever the mesh), not necessarily an eager build.
    """
    abstract = nnx.eval_shape(build_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    @jax.jit(out_shardings=shardings)
    def init() -> nnx.State:
        return nnx.state(build_fn())

    return nnx.merge(graphdef, init())


def constrain(x: jax.Array, logical_names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """``with_sharding_constraint`` of an activation by logical names under the current mesh.

    Uses the mesh set by ``jax.set_mesh``; a no-op when none is active (single-device code and tests
    run unchanged). The size-1 / divisibility fallbacks apply against ``x.shape``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(logical_names, rules, mesh=mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, spec)
