"""Reading ``torch.save`` checkpoints without PyTorch, and without running code from them.

The inference path must read the official Wan releases (``Wan2.1_VAE.pth``, the UMT5 encoder) on
hosts where torch is not installed, and a user's ``.pth`` is untrusted: a pickle can call anything.
So the zip format ``torch.save`` writes since torch 1.6 (``<root>/data.pkl``, raw storages in
``<root>/data/<key>``, ``<root>/byteorder``) is unpickled here with a ``find_class`` that knows only
what a plain state dict needs; anything else stops the read before it is built. Tensors come back
as NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``), storages are memory-mapped where the archive
stores them uncompressed (as torch does), so a multi-GB file is not read into memory twice.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # pre-1.6 files open with a pickled 10-byte magic number


class _StorageType(str):
    """What ``torch.<X>Storage`` resolves to: its name; neither callable nor changeable by a pickle's BUILD."""

    __slots__ = ()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self])


def _index(value: Any) -> bool:
    return type(value) is int and value >= 0


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """torch's tensor record -> a contiguous copy; every index is bounds-checked (``as_strided`` is not)."""
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1 and _index(offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and all(map(_index, size + stride)) and len(size) == len(stride)):
        raise TypeError("malformed tensor record")
    if math.prod(size) == 0:
        return np.zeros(size, storage.dtype)
    if offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= storage.size:
        raise IndexError(f"tensor of size {size} at offset {offset} overruns its storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride))
    return np.array(view, order="C")  # a copy: the storage is a read-only map of the file


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # nn.Parameter: only its tensor matters (requires_grad, hooks and state are dropped)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RefusedError(ValueError):
    """A refusal whose message is already complete (not wrapped as a damaged file)."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str, archive: zipfile.ZipFile, root: str, big_endian: bool):
        super().__init__(file)
        self.path, self.archive, self.root, self.big_endian = path, archive, root, big_endian
        self.storages: dict[str, np.ndarray] = {}
        self.mapped: np.ndarray | None = None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise _RefusedError(
                f"refusing to load {self.path}: it holds more than plain tensors (it references {module}.{name}), "
                "which a weights-only reader (like torch.load(weights_only=True)) refuses. User .pth files are "
                "never fully unpickled; if you trust the file, convert it to .safetensors yourself.")
        return _ALLOWED[module, name]

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise TypeError(f"unexpected persistent id {pid!r:.100}")
        dtype, key, numel = pid[1].dtype, pid[2], pid[4]
        if key not in self.storages:
            self.storages[key] = self._record(f"{self.root}/data/{key}")
        raw = self.storages[key]
        if not 0 <= numel * dtype.itemsize <= raw.size:
            raise IndexError(f"storage {key} holds {raw.size} bytes, not {numel} x {dtype.itemsize}")
        raw = raw[: numel * dtype.itemsize]
        if self.big_endian and dtype.itemsize > 1:
            raw = raw.view(f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}")
        return raw.view(dtype)

    def _record(self, name: str) -> np.ndarray:
        """A record's bytes: a memory map of the file when stored uncompressed, else read."""
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise KeyError(f"storage record {name} is missing") from None
        if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
            return np.frombuffer(self.archive.read(name), np.uint8)
        if self.mapped is None:
            self.mapped = np.memmap(self.path, np.uint8, "r")
        local = bytes(self.mapped[info.header_offset: info.header_offset + 30])
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"bad local header for {name}")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        if start + info.file_size > self.mapped.size:
            raise EOFError(f"record {name} runs past the end of the file")
        return self.mapped[start: start + info.file_size]


def load_pth(path: str | os.PathLike) -> Any:
    """The object a zip-format ``torch.save`` file holds, tensors as NumPy arrays; ValueError if unreadable."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == _LEGACY_MAGIC and not zipfile.is_zipfile(path):
            raise _RefusedError(f"{path} is not a readable PyTorch file here: it is in the pre-1.6 (non-zip) "
                                "torch.save format; re-save it with torch.save from torch >= 1.6, or convert it to "
                                ".safetensors.")
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise KeyError("no <root>/data.pkl record: not a torch.save checkpoint")
            root = pkl[0].rsplit("/", 1)[0]
            order = archive.read(f"{root}/byteorder").decode() if f"{root}/byteorder" in archive.namelist() \
                else "little"
            if order not in ("little", "big"):
                raise ValueError(f"unknown byteorder {order!r}")
            with archive.open(pkl[0]) as data:
                return _Unpickler(data, path, archive, root, order == "big").load()
    except _RefusedError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, struct.error, ValueError, KeyError,
            IndexError, TypeError, AttributeError, MemoryError, RecursionError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path} is not a readable PyTorch file, truncated or damaged? ({type(e).__name__}: "
                         f"{detail[:300]})") from e
