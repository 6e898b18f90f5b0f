"""Atomic file writes (a reader never sees a half-written file, and a crash never leaves one), sets of files
published as one unit under a lock (``publish_together``, ``exclusive_lock``) and paths that may be cloud storage
(``gs://bucket/...``, through ``etils.epath`` and gcsfs).

A cloud object is written in one upload, which is atomic on GCS: readers see the old object or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
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


def writable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why a command could not write into directory ``path`` (created if missing), or ``None`` if it can.

    Checked before any work starts, by creating the directory and a temporary file in it, so a run
    does not compute for an hour and then fail on its output. Cloud storage is not probed (a bucket
    has no directories; permissions show on the first upload).
    """
    if is_remote(path):
        return None
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{p} exists and is not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{p} is not writable ({e.strerror or e})"
    return None


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


# --- Files published as one unit, under a lock -------------------------------------------------------------------
#
# A command whose output is several files that belong together (generate's OUT.mp4 + OUT.png + OUT.json) writes
# them all into a staging directory beside them (the same filesystem), records that the set is complete (a COMMIT
# file listing the names), then moves them into place: the last file of the set (the one readers take as the set's
# manifest) is removed first and renamed into place last, so a reader never sees a new file next to the previous
# run's manifest. A run killed while writing leaves only its staging directory, which the next run removes (the
# previous set stays as it was); a run killed while moving leaves a committed staging directory, which the next
# run finishes moving. Only the holder of the output's lock (``exclusive_lock``) may call these.

_COMMIT = "COMMIT"


class LockHeldError(BlockingIOError):
    """``exclusive_lock``'s path is held by another process (its pid, when it wrote one, is ``holder``)."""

    def __init__(self, path: str | os.PathLike, holder: str | None):
        self.path, self.holder = os.fspath(path), holder
        super().__init__(errno.EWOULDBLOCK, f"{self.path} is held by another process"
                         + (f" (pid {holder})" if holder else ""))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Holds ``fcntl.flock`` on the file ``path`` (created, and removed on exit) or raises ``LockHeldError`` at once.

    The holder writes its pid into the file. A process that opened the file just as its holder removed it
    notices (the path names another inode, or none) and takes the new file instead, so two processes can
    never both believe they hold the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or None
            finally:
                os.close(fd)
            raise LockHeldError(path, holder) from None
        try:
            here, ours = os.stat(path), os.fstat(fd)
            same = (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still ours: nobody else can hold it, and a waiter re-checks the inode
        os.close(fd)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_prefix(primary: Path) -> str:
    return f".{primary.name}.staging-"


def _move_committed(staging: Path, parent: Path) -> None:
    """Moves a committed staging directory's files into ``parent``: the manifest (listed last) removed first and
    renamed last. Idempotent: a second call after a kill finishes the moves the first one left."""
    names = [n for n in (staging / _COMMIT).read_text().splitlines() if n]
    if names and (staging / names[-1]).exists():
        (parent / names[-1]).unlink(missing_ok=True)
    for name in names:
        if (staging / name).exists():
            os.replace(staging / name, parent / name)
    _fsync(parent, directory=True)
    shutil.rmtree(staging)


def recover_file_set(targets: Sequence[str | os.PathLike]) -> list[str]:
    """Cleans up after a killed ``publish_together`` of ``targets``; returns what it did, one line each.

    A staging directory without COMMIT (killed while writing) is removed: the previous set is untouched. A
    committed one (killed while moving) is moved into place. Stray temporary files of ``atomic_write`` beside the
    targets are removed. Call only while holding the output's lock.
    """
    paths = [Path(t) for t in targets]
    parent, done = paths[0].parent, []
    if not parent.is_dir():
        return done
    for d in sorted(parent.glob(glob.escape(_staging_prefix(paths[0])) + "*")):
        if not d.is_dir():
            continue
        if (d / _COMMIT).is_file():
            _move_committed(d, parent)
            done.append(f"finished publishing the set left in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed the unfinished {d}")
    for p in paths:
        for stray in parent.glob(glob.escape(f".{p.name}.") + "*.tmp*"):
            if stray.is_file():
                stray.unlink(missing_ok=True)
                done.append(f"removed the temporary file {stray}")
    return done


@contextlib.contextmanager
def publish_together(targets: Sequence[str | os.PathLike]) -> Iterator[Path]:
    """Yields a staging directory; write each of ``targets``' files there under its own name. On a clean exit the
    set is committed and moved into place as one unit (``targets[-1]``, the manifest, last); on an exception the
    staging directory is removed and whatever was at ``targets`` stays as it was.

    Local paths only, all in one directory; call only while holding the output's lock (``exclusive_lock``).
    """
    paths = [Path(t) for t in targets]
    parent = paths[0].parent
    if any(p.parent != parent for p in paths):
        raise ValueError(f"publish_together: {[str(p) for p in paths]} are not all in one directory.")
    parent.mkdir(parents=True, exist_ok=True)
    recover_file_set(paths)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=_staging_prefix(paths[0])))
    try:
        yield staging
        missing = [p.name for p in paths if not (staging / p.name).is_file()]
        if missing:
            raise FileNotFoundError(f"publish_together: {missing} were not written into {staging}.")
        for p in paths:
            _fsync(staging / p.name)
        atomic_write_text(staging / _COMMIT, "".join(p.name + "\n" for p in paths))
        _fsync(staging, directory=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_committed(staging, parent)
