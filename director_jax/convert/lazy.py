"""Safetensors weights opened without reading them: shapes from the headers, any slice read on demand.

A 14B transformer does not fit in every host's memory, so the trainer's sharded initialisation
(``build.shard_init``) asks each tensor only for the slices its devices hold. ``lazy_checkpoint``
finds the weights and their config exactly as ``checkpoint.read_checkpoint`` does for safetensors
(a diffusers or pipeline directory, a ``.safetensors`` file, a sharded index; diffusers or official
layout), but its ``state`` holds ``LazyTensor``s; any other source (``.pth``, a state dict) gives
None, and the caller reads it whole. Dtypes are checked from the headers (floating point only);
values are checked for NaN / infinity in each slice read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.convert.checkpoint import Checkpoint, ModelFormat, _read_json, _strip, check_class_name, parse_config
from director_jax.convert.state_dict import DIFFUSERS_INDEX, DIFFUSERS_WEIGHTS, _index_shards, safetensors_view

FLOAT_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64}  # None: read from a memory map


class LazyTensor:
    """One tensor of a safetensors file: ``shape`` / ``dtype`` from the header, ``read(index)`` reads a slice."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: str):
        self.path, self.key, self.shape, self.header_dtype = path, key, tuple(shape), dtype

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.header_dtype == "BF16" else np.dtype(FLOAT_DTYPES[self.header_dtype])

    def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The slice ``index`` (one unit-step slice per axis; None: all of it), as float32."""
        from safetensors import safe_open

        index = tuple(slice(None) for _ in self.shape) if index is None else tuple(index)
        if FLOAT_DTYPES[self.header_dtype] is None:  # bfloat16: not every safetensors reads it into NumPy
            return np.asarray(safetensors_view(self.path, self.key)[index], np.float32)
        with safe_open(str(self.path), framework="np") as f:
            part = f.get_slice(self.key)[index] if self.shape else f.get_tensor(self.key)
        return np.asarray(part, np.float32)


def open_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Name -> LazyTensor for a ``.safetensors`` file or a sharded index (headers only)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = _index_shards(path) if path.name.endswith(".safetensors.index.json") else [path]
    out = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                    part = f.get_slice(key)
                    dtype = part.get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise ValueError(f"weights from {file}: {key!r} has dtype {dtype} (shape "
                                         f"{tuple(part.get_shape())}), but the model's weights are floating point; "
                                         "is this the right file?")
                    out[key] = LazyTensor(file, key, tuple(part.get_shape()), dtype)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is not a readable safetensors file ({' '.join(str(e).split())}).") from e
    return out


def _weights_file(directory: Path) -> Path | None:
    for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX):
        if (directory / name).exists():
            return directory / name
    return None


def lazy_checkpoint(fmt: ModelFormat, src: Any) -> Checkpoint | None:
    """``read_checkpoint(fmt, src)`` with ``LazyTensor`` values, or None when ``src`` is not safetensors."""
    if isinstance(src, Mapping):
        return None
    path = Path(src)
    if path.is_dir():
        directory = path
        sub = directory / fmt.pipeline_subfolder
        if not (directory / "config.json").exists() and (sub / "config.json").exists():
            directory = sub
        weights = _weights_file(directory)
        if weights is None or not (directory / "config.json").exists():
            return None  # read_checkpoint says what is missing
        dir_config = _read_json(directory / "config.json")
        state = _strip(fmt, open_safetensors(weights))
        if fmt.looks_official(state):
            return Checkpoint(fmt.official_config(state, dir_config), state, "official", f"directory {directory}")
        check_class_name(fmt, dir_config, str(directory / "config.json"))
        return Checkpoint(fmt.parse_config(dir_config), state, "diffusers", f"directory {directory}")
    if not (path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json")):
        return None
    if not path.is_file():
        return None
    state = _strip(fmt, open_safetensors(path))
    source = f"{path.suffix or 'weight'} file {path}"
    beside = path.parent / "config.json"
    official = fmt.looks_official(state)
    if official:
        cfg = fmt.official_config(state, _read_json(beside) if beside.exists() else None)
    elif beside.exists():
        cfg = parse_config(fmt, beside)
    else:
        raise ValueError(f"{path} holds diffusers-layout weights but no config: pass the config "
                         "(config= / --config), or put the model's config.json next to the file.")
    return Checkpoint(cfg, state, "official" if official else "diffusers", source)
