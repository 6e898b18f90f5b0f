"""Atomic file writes (a reader never sees a half-written file, and a crash never leaves one) and paths that may
be cloud storage (``gs://bucket/...``, through ``etils.epath`` and gcsfs).

A cloud object is written in one upload, which is atomic on GCS: readers see the old object or the new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from etils import epath


def _default_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names cloud storage (``gs://``, ``s3://``...) rather than the local disk."""
    return "://" in os.fspath(path)


def storage_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: cloud storage as it is, a local path made absolute.

    ``pathlib.Path("gs://b/x")`` would collapse the scheme's ``//`` into ``gs:/b/x``, a local directory.
    """
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def dir_path(path: str | os.PathLike) -> Path | epath.Path:
    """A directory the commands write into: ``pathlib.Path`` locally (as given), ``epath.Path`` in the cloud."""
    return storage_path(path) if is_remote(path) else Path(path)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path | epath.Path:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it into place.

    The file gets the usual permissions (0666 less the umask; mkstemp alone would leave 0600). A cloud
    ``path`` gets the temporary file from the local temp directory, uploaded as one object.
    """
    if is_remote(path):
        return _upload_written(storage_path(path), write)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _upload_written(path: epath.Path, write: Callable[[str], None]) -> epath.Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Path(tmp).read_bytes())
    finally:
        os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path | epath.Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
