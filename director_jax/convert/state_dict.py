"""Reading and writing PyTorch-style state dicts safely, and checking them against a model.

Shared by every converter (VAE, DiT, SR): weight files from users are untrusted, so ``.pth`` goes
only through ``pth.load_pth`` (plain tensors only, never a full unpickle); safetensors is preferred
and written. Reading needs no torch (bfloat16 safetensors are parsed here where safetensors' NumPy
API cannot return bfloat16), so inference runs where torch is not installed. A file
that cannot be read (truncated, damaged, not a weight file) is a ``ValueError`` naming it in one
line; a sharded index's shard names must stay inside the index's directory (no absolute paths, no
``..``; symlinked shards, as in the Hugging Face cache, are fine). ``check_weight_values`` refuses
tensors that are not floating point and, unless asked to allow them, NaN or infinite values.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from director_jax.convert.pth import load_pth
from director_jax.io_utils import atomic_write, atomic_write_text

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class WeightMismatchError(ValueError):
    """A weight file does not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"weights from {source} do not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        for key, want, got in mismatched:
            lines.append(f"  wrong shape: {key}: file has {got}, model needs {want}")
        lines.append("Check that the config matches the checkpoint (e.g. base_dim, dim_mult, num_res_blocks).")
        super().__init__("\n".join(lines))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"  # ml_dtypes' bfloat16 (from a jax array) is kind "V"


def check_weight_values(state: Mapping[str, np.ndarray], source: str, *, allow_nonfinite: bool = False) -> None:
    """A ValueError unless every tensor is floating point and (unless ``allow_nonfinite``) finite.

    Names the first offending tensor in key order, and how many there are.
    """
    for key in sorted(state):
        value = state[key]
        dtype = getattr(value, "dtype", None)
        if not isinstance(value, np.ndarray) or dtype is None or dtype.kind == "O":
            raise ValueError(f"weights from {source}: {key!r} is not a tensor; a weight file must map names to "
                             "float tensors.")
        if not _float_dtype(dtype):
            raise ValueError(f"weights from {source}: {key!r} has dtype {dtype.name} (shape {tuple(value.shape)}), "
                             "but the model's weights are floating point; is this the right file?")
    if allow_nonfinite:
        return
    bad = [k for k in sorted(state) if not np.isfinite(state[k]).all()]
    if bad:
        first = np.asarray(state[bad[0]])
        nan = int(np.isnan(first).sum())
        inf = int(first.size - nan - np.isfinite(first).sum())
        others = f" (and {len(bad) - 1} more tensors: {', '.join(bad[1:4])}{', ...' if len(bad) > 4 else ''})" \
            if len(bad) > 1 else ""
        raise ValueError(f"weights from {source} hold non-finite values: {bad[0]!r} has {nan} NaN and {inf} "
                         f"infinite of {first.size} values{others}. Refused; pass --allow_nonfinite "
                         "(allow_nonfinite=True) to convert them anyway.")


def check_state_dict(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, np.ndarray],
                     source: str) -> None:
    """Raises WeightMismatchError unless ``state`` has exactly the expected keys and shapes."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        (k, tuple(expected[k]), tuple(np.shape(state[k])))
        for k in sorted(expected)
        if k in state and tuple(np.shape(state[k])) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        raise WeightMismatchError(source, missing, unexpected, mismatched)


def to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _bf16_as_f32(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, np.float32) if value.dtype == ml_dtypes.bfloat16 else value


SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                      "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """(name -> {"dtype", "shape", "data_offsets"}, where the data starts), every entry checked.

    Parsed here (8-byte little-endian length, then a JSON header) because safetensors' NumPy API
    refuses bfloat16 in older versions and without ml_dtypes; cached per file version, since lazy
    reads ask once per slice.
    """
    stat = os.stat(path)
    return _safetensors_header(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _safetensors_header(path: str, _mtime_ns: int, size: int) -> tuple[dict[str, dict[str, Any]], int]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} does not fit the file of {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        for key, entry in header.items():
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{key!r} has dtype {dtype}, which is not supported")
            if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]) or not (
                    begin <= end <= size - 8 - length
                    and end - begin == math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize):
                raise ValueError(f"{key!r} has a bad shape {shape} or data offsets {[begin, end]}")
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, KeyError,
            AttributeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({_one_line(e)}).") from e
    return header, 8 + length


def safetensors_view(path: str | os.PathLike, key: str, mapped: np.ndarray | None = None) -> np.ndarray:
    """Tensor ``key`` of a safetensors file as a read-only memory map (bfloat16 as ``ml_dtypes.bfloat16``)."""
    header, start = safetensors_header(path)
    entry = header[key]
    mapped = np.memmap(path, np.uint8, "r") if mapped is None else mapped
    begin, end = entry["data_offsets"]
    return mapped[start + begin: start + end].view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, copied out of a memory map; bfloat16 as float32."""
    header, _ = safetensors_header(path)
    mapped = np.memmap(path, np.uint8, "r")
    return {key: _bf16_as_f32(np.array(safetensors_view(path, key, mapped))) for key in header}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file, a sharded safetensors index, or a ``.pth``/``.pt`` file; no torch.

    ``.pth`` files are read by ``pth.load_pth`` (plain tensors only, no arbitrary unpickling); a
    top-level ``state_dict`` / ``model`` / ``module`` wrapper holding a dict of tensors is unwrapped.
    bfloat16 tensors come back as float32.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist.")
    if path.name.endswith(".safetensors.index.json"):
        state: dict[str, np.ndarray] = {}
        for shard in _index_shards(path):
            state.update(read_state_dict(shard))
        return state
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a weight file.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            try:  # bfloat16 may come back as ml_dtypes.bfloat16 (the pinned safetensors): returned as float32
                return {k: _bf16_as_f32(v) for k, v in load_file(str(path)).items()}
            except TypeError:  # a safetensors with no NumPy bfloat16: read the file ourselves
                return _read_safetensors(path)
        except (SafetensorError, struct.error, OverflowError) as e:  # truncated, a bad header, not safetensors
            raise ValueError(f"{path} is not a readable safetensors file ({_one_line(e)}).") from e
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj = load_pth(path)  # no torch, no arbitrary unpickling: a ValueError naming the file if refused
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and set(obj) == {wrapper}:
                obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
        return {k: _bf16_as_f32(to_numpy(v)) for k, v in obj.items()}
    raise ValueError(f"unknown weight file type {path.name!r}: use .safetensors, a .safetensors index, or .pth.")


def _index_shards(path: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each checked to lie inside its directory."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid JSON index ({_one_line(e)}).") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{path} is not a safetensors index: it needs a non-empty \"weight_map\" object of "
                         "tensor name -> shard file name.")
    shards = []
    for name in sorted(set(weight_map.values())):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in name or "\0" in name:
            raise ValueError(f"{path} names the shard {name!r}, which is not a file inside {path.parent} (absolute "
                             "paths and '..' are refused).")
        shard = path.parent / rel
        if not shard.is_file():
            raise FileNotFoundError(f"{path} names the shard {name!r}, but {shard} is missing.")
        shards.append(shard)
    return shards


def read_diffusers_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A diffusers model directory -> (config dict, state dict); single-file or sharded weights."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json: it is not a diffusers model directory.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({_one_line(e)}).") from e
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, not {type(config).__name__}.")
    for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX):
        if (directory / name).exists():
            return config, read_state_dict(directory / name)
    raise FileNotFoundError(f"{directory} has neither {DIFFUSERS_WEIGHTS} nor {DIFFUSERS_INDEX}.")


DEFAULT_MAX_SHARD_BYTES = 10 * 1024**3  # diffusers' save_pretrained default ("10GB")


def _shard(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    return shards


EXPORT_DTYPES = ("float32", "bfloat16")


def write_diffusers_dir(directory: str | os.PathLike, config: dict, state: Mapping[str, np.ndarray],
                        class_name: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        dtype: str = "float32") -> Path:
    """Writes ``config.json`` and safetensors weights (float32, or ``dtype="bfloat16"``), every file atomically.

    Weights over ``max_shard_bytes`` are split into diffusers' sharded form
    (``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + ``...safetensors.index.json``), which
    ``from_pretrained`` reads. Weight files of an earlier export in the other form are removed, so a
    reader never picks up stale weights.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, **config}
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: choose one of {EXPORT_DTYPES}.")
    target = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(target)) for k, v in state.items()}
    shards = _shard(tensors, max_shard_bytes)
    old_shards = set(directory.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    if len(shards) == 1:
        atomic_write(directory / DIFFUSERS_WEIGHTS, lambda tmp: save_file(tensors, tmp))
        stale = [directory / DIFFUSERS_INDEX, *old_shards]
    else:
        weight_map = {}
        names = []
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp))
            weight_map.update(dict.fromkeys(shard, name))
            names.append(directory / name)
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        atomic_write_text(directory / DIFFUSERS_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        stale = [directory / DIFFUSERS_WEIGHTS, *(old_shards - set(names))]
    for path in stale:
        path.unlink(missing_ok=True)
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory
