"""Logical axis names -> mesh axes: the rules table, partition specs, sharded init, constraints.

Every parameter carries logical axis names in its ``out_sharding`` metadata (see
``director_jax.models.layers.param``); activations are annotated with ``constrain``. A rules table
maps each name to mesh axes (``None`` = replicated, a name, or a tuple of names sharded jointly).
The table comes from the config (``mesh.rules``, read by ``rules_from_config``: entries replace the
default rule of their logical name); ``DEFAULT_RULES`` is the default:

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
  on a batch of 2 with data=2, fsdp=4 gives "data"; a 42-wide dim on tensor=4 is replicated);
* a project mesh axis (``MESH_AXES``) that the mesh lacks counts as an axis of size 1: any mesh
  works, e.g. ``jax.make_mesh((2, 4), ("data", "sequence"))`` places "batch" on "data" and tokens
  on "sequence". (Tables are still checked: ``validate_rules`` / ``rules_from_config`` reject
  names that are not project mesh axes, and a rule naming such an axis the mesh lacks raises.)

Functions that take ``rules`` use the *active* table when it is ``None``: ``DEFAULT_RULES``, or the
one set by ``with axis_rules(table):``. Activation constraints inside models (``constrain``) always
read the active table, so the trainer sets it around tracing its init and step. It is read when a
function is traced: a function jitted under one table keeps that table in its compiled program.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from director_jax.parallel.mesh import MESH_AXES

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


_ACTIVE_RULES: contextvars.ContextVar[tuple[tuple[str, MeshAxes], ...]] = contextvars.ContextVar(
    "director_jax_axis_rules", default=DEFAULT_RULES)


def _bad_entry(where: str, entry: Any, why: str) -> ValueError:
    return ValueError(f"{where} entry {entry!r}: {why}. Each entry is [logical_name, mesh_axes] with mesh_axes "
                      f"None (replicated), one mesh axis or a list of them; the mesh axes are {MESH_AXES}.")


def validate_rules(rules: Rules, *, where: str = "Axis rules") -> tuple[tuple[str, MeshAxes], ...]:
    """``rules`` as a tuple of ``(logical_name, mesh_axes)`` pairs; a ValueError naming a bad entry.

    An entry is a pair: a logical name (a string, once per table) and ``None``, a mesh axis of
    ``MESH_AXES`` or a list of distinct ones (an empty list is ``None``).
    """
    if isinstance(rules, str | Mapping) or not isinstance(rules, Sequence):
        raise ValueError(f"{where} must be a list of [logical_name, mesh_axes] pairs; got {rules!r}.")
    out: list[tuple[str, MeshAxes]] = []
    seen: set[str] = set()
    for entry in rules:
        if isinstance(entry, str) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise _bad_entry(where, entry, "not a [logical_name, mesh_axes] pair")
        name, axes = entry
        if not isinstance(name, str) or not name:
            raise _bad_entry(where, entry, "the logical name must be a non-empty string")
        if name in seen:
            raise _bad_entry(where, entry, f"a second rule for {name!r}")
        seen.add(name)
        if axes is not None and not isinstance(axes, str):
            if not isinstance(axes, Sequence) or not all(isinstance(a, str) for a in axes):
                raise _bad_entry(where, entry, "mesh_axes must be None, a mesh axis name or a list of them")
            axes = tuple(axes) or None
        unknown = [a for a in _as_tuple(axes) if a not in MESH_AXES]
        if unknown:
            raise _bad_entry(where, entry, f"unknown mesh axis {unknown[0]!r}")
        if len(set(_as_tuple(axes))) != len(_as_tuple(axes)):
            raise _bad_entry(where, entry, "a mesh axis appears twice")
        out.append((name, axes))
    return tuple(out)


def rules_from_config(cfg: Any) -> tuple[tuple[str, MeshAxes], ...]:
    """The rules table of a config: ``DEFAULT_RULES`` with each ``cfg.mesh.rules`` entry replacing its name's rule.

    ``cfg.mesh.rules`` is ``None`` (or absent) for the default table, else a list of
    ``[logical_name, mesh_axes]`` pairs, e.g. ``[["embed", "tensor"]]`` to shard the model width
    over the tensor axis, or ``[["embed", None]]`` to replicate it. Malformed entries, unknown mesh
    axes and logical names no model uses raise a ValueError naming the entry.
    """
    mesh = cfg.get("mesh")
    entries = None if mesh is None else mesh.get("rules")
    if entries is None:
        return DEFAULT_RULES
    changes = dict(validate_rules(entries, where="mesh.rules"))
    known = dict(DEFAULT_RULES)
    for name, axes in changes.items():
        if name not in known:
            raise ValueError(f"mesh.rules entry {[name, axes]!r}: no model uses the logical axis {name!r}; the "
                             f"logical axes are {tuple(known)}.")
    return tuple((name, changes.get(name, axes)) for name, axes in DEFAULT_RULES)


def current_rules() -> tuple[tuple[str, MeshAxes], ...]:
    """The active rules table: the innermost ``axis_rules`` one, else ``DEFAULT_RULES``."""
    return _ACTIVE_RULES.get()


@contextlib.contextmanager
def axis_rules(rules: Rules | None) -> Iterator[tuple[tuple[str, MeshAxes], ...]]:
    """Makes ``rules`` (validated; ``None`` keeps the active table) the active table inside the block.

    Set it around tracing (``jax.jit(...).lower``, the first call of a jitted function, or inside the
    jitted function itself): ``constrain`` and every helper here given no ``rules`` read it then.
    """
    table = current_rules() if rules is None else validate_rules(rules)
    token = _ACTIVE_RULES.set(table)
    try:
        yield table
    finally:
        _ACTIVE_RULES.reset(token)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _axis_sizes(mesh: Any) -> Mapping[str, int] | None:
    if mesh is None or getattr(mesh, "empty", False):
        return None
    return dict(mesh.shape)


def logical_to_mesh_spec(logical_names: Sequence[str | None], rules: Rules | None = None, *,
                         mesh: Mesh | Any | None = None, shape: Sequence[int] | None = None) -> PartitionSpec:
    """The ``PartitionSpec`` for a tensor whose dims carry ``logical_names`` (``None`` = replicated).

    Each mesh axis is used at most once. With ``mesh`` (a ``Mesh`` or ``AbstractMesh``) mesh axes of
    size 1, and project mesh axes (``MESH_AXES``) the mesh does not have, are dropped; with ``shape``
    too, a dim keeps its mesh axes only while their product divides it (see the module docstring).
    Unknown logical names raise: add them to the table. ``rules`` defaults to the active table
    (``current_rules``).
    """
    table = dict(current_rules() if rules is None else rules)
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
                    if axis in MESH_AXES:  # a user's mesh without this project axis: as if of size 1
                        continue
                    raise ValueError(f"Rule {name!r} -> {axis!r}: the mesh has no axis {axis!r}; its axes are "
                                     f"{tuple(sizes)}.")
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


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """A state of ``NamedSharding`` (one per variable) from each ``nnx.Param``'s ``out_sharding`` names.

    Takes a module or a (possibly abstract) state; parameters without names and non-parameter
    variables (RNG keys, counters, batch statistics) are replicated. ``rules``: default the active table.
    """
    rules = current_rules() if rules is None else rules
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)

    def sharding(variable: nnx.Variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Param) else None
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        shape = variable.get_value().shape
        return NamedSharding(mesh, logical_to_mesh_spec(names, rules, mesh=mesh, shape=shape))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def sharded_init(build_fn: Callable[[], M], mesh: Mesh, rules: Rules | None = None) -> M:
    """Builds ``build_fn()`` with every parameter created directly in its shards (never a full copy).

    ``nnx.eval_shape`` gives the abstract model, ``param_shardings`` its shardings, and the build runs
    under ``jax.jit(..., out_shardings=...)``. ``build_fn`` must make its own ``nnx.Rngs`` (no state
    captured from outside the trace). Random initialisers run as traced JAX ops here, so values match
    another jitted build from the same seed (whatever the mesh), not necessarily an eager build.
    ``rules`` (default: the active table) places the parameters and is active while building.
    """
    rules = current_rules() if rules is None else validate_rules(rules)
    abstract = nnx.eval_shape(build_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)

    @jax.jit(out_shardings=shardings)
    def init() -> nnx.State:
        with axis_rules(rules):
            return nnx.state(build_fn())

    return nnx.merge(graphdef, init())


def _keep_axes(spec: PartitionSpec, keep: Callable[[str], bool]) -> PartitionSpec:
    """``spec`` with only the mesh axes ``keep`` accepts (a dim left with none is replicated)."""
    dims: list[MeshAxes] = []
    for axes in spec:
        kept = tuple(a for a in _as_tuple(axes) if keep(a))
        dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*dims)


def place(x: jax.Array, spec: PartitionSpec, *, auto: bool = True) -> jax.Array:
    """Shards ``x`` as ``spec`` on the active mesh, whatever its axis types (a no-op without a mesh).

    ``Explicit`` axes (``jax.make_mesh``'s default) are set with ``jax.reshard``, ``Auto`` axes (the
    project's ``create_mesh``) with ``with_sharding_constraint`` (skipped with ``auto=False``, e.g.
    before a ``shard_map``, which reshards those itself); ``Manual`` axes (inside a ``shard_map``) are
    left alone. Each call only names the axes of its own type, as JAX requires.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = [a for a, t in types.items() if t == jax.sharding.AxisType.Explicit]
    if explicit:
        x = jax.reshard(x, _keep_axes(spec, lambda a: a in explicit))
    if auto and any(t == jax.sharding.AxisType.Auto for t in types.values()):
        x = jax.lax.with_sharding_constraint(x, _keep_axes(spec, lambda a: types.get(a) == jax.sharding.AxisType.Auto))
    return x


def constrain(x: jax.Array, logical_names: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Shards an activation by logical names under the current mesh (``place``: a sharding constraint).

    Uses the mesh set by ``jax.set_mesh`` and the active rules table (``axis_rules``) unless ``rules``
    is given; a no-op when no mesh is active (single-device code and tests run unchanged). The
    size-1 / divisibility / missing-axis fallbacks apply against ``x.shape``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return place(x, logical_to_mesh_spec(logical_names, rules, mesh=mesh, shape=x.shape))


MeshContext = tuple[Mesh, tuple[tuple[str, MeshAxes], ...]] | None


@contextlib.contextmanager
def traced_under(context: MeshContext) -> Iterator[None]:
    """Inside a jitted function: activation constraints (and shard_map) see ``context``'s mesh and rules.

    ``context`` is ``(mesh, rules)`` or None (single device: nothing to set). Pass it to the jitted
    function as a static argument, so a trace under one mesh or table is never reused under another.
    """
    if context is None:
        yield
        return
    mesh, rules = context
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), axis_rules(rules):
        yield
