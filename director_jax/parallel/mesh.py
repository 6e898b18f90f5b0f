"""Device mesh creation from a ``MeshConfig``: axes ``data``, ``fsdp``, ``tensor``, ``sequence``.

Sizes are per slice (ICI); ``-1`` means "the rest of the devices" (at most one ``-1`` per level).
Multi-slice (DCN) sizes multiply the ICI sizes axis by axis: a mesh with ``fsdp=4`` inside each
slice and ``dcn_data=2`` across two slices has ``data=2, fsdp=4``. With more than one slice the
device order comes from ``mesh_utils.create_hybrid_device_mesh`` (slow DCN links on the outer
axes), otherwise from ``mesh_utils.create_device_mesh`` (ICI-topology aware on TPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "sequence")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes. ICI sizes are per slice; ``dcn_*`` sizes count slices (1 = single slice)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_sequence: int = 1

    @classmethod
    def from_dict(cls, sizes: Mapping[str, int]) -> MeshConfig:
        """From ``{"data": 2, "fsdp": -1}``; a nested ``"dcn": {"data": 2}`` sets the slice sizes."""
        sizes = dict(sizes)
        dcn = sizes.pop("dcn", None) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(sizes) - fields) + sorted(f"dcn.{k}" for k in set(dcn) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"Unknown mesh axes {unknown}; the axes are {MESH_AXES} (and dcn_<axis>).")
        kwargs = dict(sizes)
        kwargs.update({f"dcn_{k}": v for k, v in dcn.items()})
        return cls(**kwargs)

    @property
    def ici_sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @property
    def dcn_sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, f"dcn_{a}") for a in MESH_AXES)


def resolve_sizes(sizes: Sequence[int], count: int, *, what: str = "devices",
                  names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Replaces a single ``-1`` by ``count // product(others)``; raises unless the product is ``count``."""
    sizes = tuple(int(s) for s in sizes)
    named = dict(zip(names, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh sizes must be positive or -1; got {named}.")
    wildcards = [i for i, s in enumerate(sizes) if s == -1]
    if len(wildcards) > 1:
        raise ValueError(f"At most one mesh size may be -1 ('the rest'); got {named}.")
    known = math.prod(s for s in sizes if s != -1)
    if wildcards:
        if count % known:
            raise ValueError(f"Mesh sizes {named}: the fixed sizes multiply to {known}, which does not divide "
                             f"the {count} {what}.")
        sizes = tuple(count // known if s == -1 else s for s in sizes)
    elif known != count:
        raise ValueError(f"Mesh sizes {named} multiply to {known} but there are {count} {what}.")
    return sizes


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(config: MeshConfig | Mapping[str, int] | None = None,
                devices: Sequence[Any] | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes ``MESH_AXES`` sized by ``config`` (default: all devices on fsdp)."""
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        config = MeshConfig.from_dict(config)
    devices = list(jax.devices() if devices is None else devices)
    slices = _num_slices(devices)
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices do not split evenly into {slices} slices.")
    dcn = resolve_sizes(config.dcn_sizes, slices, what="slices")
    ici = resolve_sizes(config.ici_sizes, len(devices) // slices, what="devices per slice")
    if math.prod(dcn) > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices)
    return Mesh(np.asarray(device_array).reshape([i * d for i, d in zip(ici, dcn, strict=True)]), MESH_AXES)


def inference_mesh(spec: str = "auto", devices: Sequence[Any] | None = None) -> Mesh | None:
    """The mesh ``generate`` / ``evaluate`` shard the model over, from ``--mesh``; None: one device.

    ``"auto"``: every local accelerator on ``fsdp`` (a 14B model's weights spread over a host's chips),
    one device on a CPU, whose devices share one memory; ``"single"``: one device;
    ``"fsdp=2,tensor=4"`` (any of ``MESH_AXES``, one ``-1`` allowed): that mesh over the first devices
    it needs. A spec that does not parse or does not fit the devices is a ``ValueError`` naming it.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    spec = str(spec).strip().lower()
    if spec == "single" or (spec == "auto" and (len(devices) == 1 or devices[0].platform == "cpu")):
        return None
    if spec == "auto":
        return create_mesh({"fsdp": -1}, devices)
    sizes = parse_mesh_sizes(spec, "--mesh", "auto, single, or sizes like fsdp=2,tensor=4")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fixed > len(devices) or (-1 in sizes.values() and len(devices) % fixed):
        raise ValueError(f"--mesh {spec!r} needs {fixed} devices; there are {len(devices)} here.")
    count = len(devices) if -1 in sizes.values() else fixed
    return create_mesh({"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, **sizes}, devices[:count])


def parse_mesh_sizes(spec: str, what: str, forms: str, axes: Sequence[str] = MESH_AXES) -> dict[str, int]:
    """``"fsdp=2,tensor=4"`` -> {"fsdp": 2, "tensor": 4}: each of ``axes`` at most once, one size may be -1."""
    sizes: dict[str, int] = {}
    for part in str(spec).split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            size = int(value)
        except ValueError:
            size = 0
        if not sep or name not in axes or name in sizes or size == 0 or size < -1:
            raise ValueError(f"{what} {spec!r}: write {forms} (axes {', '.join(axes)}; each once; one may be -1 for "
                             "the rest).")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"{what} {spec!r}: at most one size may be -1.")
    return sizes
