"""Parallelism: device mesh, logical axis rules and sharding helpers."""

from director_jax.parallel.mesh import MESH_AXES, MeshConfig, create_mesh, resolve_sizes
from director_jax.parallel.rules import (
    DEFAULT_RULES,
    axis_rules,
    constrain,
    current_rules,
    logical_to_mesh_spec,
    param_shardings,
    place,
    rules_from_config,
    sharded_init,
    validate_rules,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "axis_rules",
    "constrain",
    "create_mesh",
    "current_rules",
    "logical_to_mesh_spec",
    "param_shardings",
    "place",
    "resolve_sizes",
    "rules_from_config",
    "sharded_init",
    "validate_rules",
]
