"""Parallelism: device mesh, logical axis rules and sharding helpers."""

from director_jax.parallel.mesh import MESH_AXES, MeshConfig, create_mesh, resolve_sizes
from director_jax.parallel.rules import (
    DEFAULT_RULES,
    constrain,
    logical_to_mesh_spec,
    param_shardings,
    sharded_init,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MeshConfig",
    "constrain",
    "create_mesh",
    "logical_to_mesh_spec",
    "param_shardings",
    "resolve_sizes",
    "sharded_init",
]
