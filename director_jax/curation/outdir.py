"""The curated directory's files and their crash safety: what is done, what is skipped, what a rerun redoes.

Per source, every clip is written (temp file, fsync, rename; ``director_jax.curation.source``),
then all its manifest lines in one appended write (fsync), then its shots.jsonl line (fsync), which
marks the source done. ``OutputDir.recover`` (at the start of every run) drops manifest lines of
sources without a shots.jsonl line, duplicates, torn last lines and leftover temp or orphan clip
files, so a rerun does only the sources not yet done or skipped.

One run writes a directory at a time: ``lock_output`` holds an exclusive, non-blocking ``flock`` on
``OUT/.lock`` for the whole run (the kernel releases it when the process exits, however it dies), so
two runs cannot both append a source's lines; the second is refused with ``UserError``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from director_jax.errors import UserError
from director_jax.io_utils import atomic_write_text

log = logging.getLogger(__name__)

SHOTS, MANIFEST, SKIPPED, SUMMARY, CLIPS = "shots.jsonl", "manifest.jsonl", "skipped.jsonl", "summary.json", "clips"
CAPTION_CACHE = "caption_cache.jsonl"  # the VLM captioner's answers by request digest (curation/vlm_client.py)
LOCK = ".lock"
COMMIT_LOCK = ".commit.lock"  # held while one source's lines are appended (Beam workers append from many processes)
_CLIP_NAME = re.compile(r"^[0-9a-f]{16}\.mp4$")


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON lines of ``path`` and how many lines were unreadable (a write torn by a crash)."""
    if not path.exists():
        return [], 0
    lines, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(value, dict) and "source" in value:
                lines.append(value)
            else:
                bad += 1
    return lines, bad


def _jsonl_text(lines: Iterable[dict]) -> str:
    return "".join(json.dumps(line) + "\n" for line in lines)


def _append(path: Path, lines: Sequence[dict]) -> None:
    """One appended write of whole lines, flushed and fsynced (a crash leaves at most a torn last line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(_jsonl_text(lines))
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _commit_lock(root: Path):
    """An exclusive, blocking ``flock`` on ``root/.commit.lock`` for one source's appends (released on exit)."""
    with open(root / COMMIT_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def lock_output(root: str | os.PathLike):
    """Creates ``root`` and holds an exclusive lock on ``root/.lock`` (see the module doc); ``UserError`` if taken."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / LOCK, "a")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as e:
        raise UserError(f"cannot write the output directory {root}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"another curate run is writing {root} (it holds {root / LOCK}); wait for it to finish "
                            "or give another --out.") from None
        try:
            yield root
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


class OutputDir:
    """The curated directory's state: done and skipped sources, sample ids; recovery after a crash."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.clips = self.root / CLIPS
        self.clips.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        self.skipped: dict[str, str] = {}  # source -> reason
        self._skip_lines: dict[str, dict] = {}  # source -> its skipped.jsonl line
        self.num_samples = 0
        self.recovered = {"torn_lines": 0, "manifest_lines_dropped": 0, "sources_redone": 0, "files_removed": 0}

    def recover(self) -> dict:
        """Makes the files consistent after any crash (see the module doc); returns what it removed."""
        shot_lines, bad_shots = _read_jsonl(self.root / SHOTS)
        skip_lines, bad_skips = _read_jsonl(self.root / SKIPPED)
        manifest, bad_manifest = _read_jsonl(self.root / MANIFEST)
        self.recovered["torn_lines"] = bad_shots + bad_skips + bad_manifest
        done = {}
        for line in shot_lines:
            done.setdefault(line["source"], line)
        # A done source whose clip files went missing is done again (its lines go).
        by_source: dict[str, list[dict]] = collections.defaultdict(list)
        seen_ids: set[str] = set()
        for line in manifest:
            if line["source"] in done and line.get("id") not in seen_ids:
                seen_ids.add(line["id"])
                by_source[line["source"]].append(line)
        broken = {s for s, lines in by_source.items() if not all((self.root / x["clip"]).is_file() for x in lines)}
        for source in broken:
            log.warning("%s: clip files listed in the manifest are missing; curating the source again", source)
            del done[source], by_source[source]
        kept_ids = {line["id"] for lines in by_source.values() for line in lines}
        kept = []
        for line in manifest:  # file order, first line of each id
            if line.get("id") in kept_ids and line["source"] in by_source:
                kept.append(line)
                kept_ids.discard(line["id"])
        self.recovered["manifest_lines_dropped"] = len(manifest) - len(kept)
        self.recovered["sources_redone"] = len(broken)
        self.done = done
        self.skipped, self._skip_lines = {}, {}
        for line in skip_lines:
            if line["source"] not in done and line["source"] not in self.skipped:
                self.skipped[line["source"]] = line.get("reason", "unknown")
                self._skip_lines[line["source"]] = line
        # Rewrite whatever changed, each file atomically.
        if bad_shots or len(done) != len(shot_lines):
            atomic_write_text(self.root / SHOTS, _jsonl_text(done.values()))
        if bad_skips or len(self.skipped) != len(skip_lines):
            atomic_write_text(self.root / SKIPPED, _jsonl_text(self._skip_lines.values()))
        if bad_manifest or len(kept) != len(manifest) or not (self.root / MANIFEST).exists():
            atomic_write_text(self.root / MANIFEST, _jsonl_text(kept))
        self.num_samples = len(kept)
        for f in self.root.glob(f".{MANIFEST}.*.tmp"):  # a source's manifest spool, never appended
            f.unlink()
            self.recovered["files_removed"] += 1
        referenced = {Path(line["clip"]).name for line in kept}
        for f in self.clips.iterdir():
            leftover_tmp = f.name.startswith(".") and ".tmp" in f.name
            if leftover_tmp or (_CLIP_NAME.match(f.name) and f.name not in referenced):
                f.unlink()
                self.recovered["files_removed"] += 1
        return dict(self.recovered)

    def add_skipped(self, source: str, reason: str, source_bytes: str | None = None) -> None:
        """Records ``source`` as skipped (``source_bytes``: the hex of a path whose name is not UTF-8)."""
        if source not in self.skipped:
            line = {"source": source, "reason": reason, **({"source_bytes": source_bytes} if source_bytes else {})}
            with _commit_lock(self.root):
                _append(self.root / SKIPPED, [line])
            self.skipped[source] = reason
            self._skip_lines[source] = line

    def spool(self) -> Path:
        """A fresh temp file for one source's manifest lines (kept on disk, not in memory, until it is done)."""
        fd, path = tempfile.mkstemp(dir=self.root, prefix=f".{MANIFEST}.", suffix=".tmp")
        os.close(fd)
        return Path(path)

    def add_source(self, shots_line: dict, spool: Path, num_samples: int) -> None:
        """The source's manifest lines (from its spool file), then its shots.jsonl line (which marks it done)."""
        _fsync_dir(self.clips)
        with _commit_lock(self.root):  # whole sources in the files, whichever process finishes first
            if num_samples:
                with spool.open("rb") as src, (self.root / MANIFEST).open("ab") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
            _append(self.root / SHOTS, [shots_line])
        spool.unlink(missing_ok=True)
        self.done[shots_line["source"]] = shots_line
        self.num_samples += num_samples
