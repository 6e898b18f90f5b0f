"""Accelerator figures the trainer needs: HBM per chip (AOT fit checks) and peak bf16 FLOP/s (MFU).

Published per-chip numbers (Google Cloud TPU system architecture pages, NVIDIA data sheets; dense
bf16, no sparsity). ``device_kind`` strings are what ``jax.Device.device_kind`` reports; a TPU
topology built with ``jax.experimental.topologies`` reports the same strings.
"""

from __future__ import annotations

import dataclasses

import jax

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str
    device_kinds: tuple[str, ...]
    hbm_bytes: float
    peak_bf16_flops: float  # per chip, dense


CHIPS: tuple[ChipSpec, ...] = (
    ChipSpec("TPU v4", ("TPU v4",), 32 * GIB, 275e12),
    ChipSpec("TPU v5e", ("TPU v5 lite", "TPU v5e"), 16 * GIB, 197e12),
    ChipSpec("TPU v5p", ("TPU v5", "TPU v5p"), 95.74 * GIB, 459e12),  # the TPU compiler's "95.74G available"
    ChipSpec("TPU v6e", ("TPU v6 lite", "TPU v6e"), 32 * GB, 918e12),
    ChipSpec("NVIDIA H100", ("NVIDIA H100 80GB HBM3", "NVIDIA H100"), 80 * GB, 989e12),
    ChipSpec("NVIDIA H200", ("NVIDIA H200",), 141 * GB, 989e12),
    ChipSpec("NVIDIA A100", ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100"), 80 * GB, 312e12),
)


def chip_spec(device_or_kind: jax.Device | str) -> ChipSpec | None:
    """The spec of a device (or ``device_kind`` string); ``None`` for CPUs and unknown chips."""
    kind = device_or_kind if isinstance(device_or_kind, str) else device_or_kind.device_kind
    for spec in CHIPS:
        if kind in spec.device_kinds:
            return spec
    for spec in CHIPS:  # e.g. "NVIDIA H100 PCIe" -> the H100 entry
        if any(kind.startswith(k) for k in spec.device_kinds):
            return spec
    return None
