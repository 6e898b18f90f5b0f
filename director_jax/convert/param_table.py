"""A model's parameters as a PyTorch state dict: one table, used both to export and to load.

Each converter (VAE, DiT, SR) builds a table mapping every PyTorch key to where the parameter lives
in the NNX module tree, the transpose between the two layouts, and the PyTorch shape. Stacked
(``nnx.scan``) layers keep all blocks in one array with a leading layer axis; their entries carry
the layer index, so ``blocks.7.attn1.to_q.weight`` is slice 7 of one stacked parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.convert.state_dict import check_state_dict


def _same(a: np.ndarray) -> np.ndarray:
    return a


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """Where one PyTorch tensor lives in the NNX tree and how its layout differs."""

    path: tuple  # attribute names / list indices from the model to the nnx.Param
    torch_shape: tuple[int, ...]
    to_torch: Callable[[np.ndarray], np.ndarray] = _same  # this project's array -> PyTorch's
    from_torch: Callable[[np.ndarray], np.ndarray] = _same  # PyTorch's array -> this project's
    layer: int | None = None  # index on the stacked-layers axis, for scanned blocks


def linear_entries(key: str, path: tuple, kernel_shape: tuple[int, int], layer: int | None = None
                   ) -> dict[str, ParamEntry]:
    """``Linear`` (kernel (in, out), bias) <-> PyTorch ``nn.Linear`` (weight (out, in), bias)."""
    d_in, d_out = kernel_shape
    return {
        f"{key}.weight": ParamEntry(path + ("kernel",), (d_out, d_in), np.transpose, np.transpose, layer),
        f"{key}.bias": ParamEntry(path + ("bias",), (d_out,), layer=layer),
    }


def get_param(model: Any, path: tuple) -> nnx.Param:
    obj = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def expected_shapes(table: Mapping[str, ParamEntry]) -> dict[str, tuple[int, ...]]:
    return {key: entry.torch_shape for key, entry in table.items()}


def export_state_dict(model: Any, table: Mapping[str, ParamEntry]) -> dict[str, np.ndarray]:
    """The model's parameters as a PyTorch state dict (float32 NumPy), in the table's layout."""
    out = {}
    for key, entry in table.items():
        value = np.asarray(get_param(model, entry.path)[...], np.float32)
        if entry.layer is not None:
            value = value[entry.layer]
        out[key] = np.ascontiguousarray(entry.to_torch(value))
    return out


def load_state_dict(model: Any, table: Mapping[str, ParamEntry], state: Mapping[str, np.ndarray],
                    source: str = "state dict") -> Any:
    """Copies a PyTorch-layout state dict into ``model`` in place; every key must fit exactly.

    ``model`` may be abstract (``nnx.eval_shape``): each parameter gets a concrete value. Stacked
    parameters are assembled from their per-layer tensors and set once.
    """
    check_state_dict(expected_shapes(table), state, source)
    stacked: dict[tuple, dict[int, np.ndarray]] = {}
    for key, entry in table.items():
        value = entry.from_torch(np.asarray(state[key], np.float32))
        if entry.layer is None:
            param = get_param(model, entry.path)
            param.set_value(jnp.asarray(value, param.get_value().dtype))
        else:
            stacked.setdefault(entry.path, {})[entry.layer] = value
    for path, layers in stacked.items():
        param = get_param(model, path)
        value = np.stack([layers[i] for i in range(len(layers))])
        if value.shape != tuple(param.get_value().shape):
            raise AssertionError(f"stacked parameter {path}: assembled {value.shape}, model has "
                                 f"{tuple(param.get_value().shape)}")
        param.set_value(jnp.asarray(value, param.get_value().dtype))
    return model
