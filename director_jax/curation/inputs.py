"""The inputs of a curation run: ``--input`` values -> the files to curate, and those skipped with a reason.

File names are bytes on POSIX; one that is not valid UTF-8 reaches Python as a ``str`` with lone
surrogates (``os.fsdecode``), which opens the file but cannot be hashed, logged or written as JSON.
So every candidate carries two names: ``path``, the OS path (opened, never written), and
``source``, its JSON-safe form (``display_path``: invalid bytes as ``\\xNN``), the key of the
output's records; ``source_bytes`` gives the exact bytes (hex) of a path that needed escaping.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


def display_path(path: str | bytes | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 become ``\\xNN`` (identity for UTF-8 names)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_bytes_hex(path: str | bytes | os.PathLike) -> str | None:
    """The hex of ``path``'s bytes when its name is not valid UTF-8 (so ``display_path`` escaped it), else None."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.hex()
    return None


def split_inputs(values: Iterable[str]) -> list[str]:
    """--input values (repeated and/or comma separated) -> paths; a value naming an existing path is kept whole."""
    out: list[str] = []
    for value in values:
        if os.path.lexists(value):
            out.append(value)
        else:
            out.extend(v.strip() for v in value.split(",") if v.strip())
    return out


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A file to curate (``reason`` None) or an input already known to be skipped (``reason`` set)."""

    path: str  # resolved absolute OS path (may hold surrogates: a name that is not UTF-8)
    reason: str | None = None
    detail: str = ""

    @property
    def source(self) -> str:
        """The JSON-safe key of this input in shots.jsonl / skipped.jsonl / manifest.jsonl."""
        return display_path(self.path)

    @property
    def source_bytes(self) -> str | None:
        """Hex of the path's bytes when ``source`` had to escape them, else None."""
        return path_bytes_hex(self.path)


def _source_key(path: str) -> str:
    return str(Path(path).resolve()) if os.path.exists(path) else os.path.abspath(path)


def _not_a_file(path: str) -> Candidate:
    if os.path.islink(path) and not os.path.exists(path):
        return Candidate(_source_key(path), "broken_symlink",
                         f"{display_path(path)} -> {display_path(os.readlink(path))}")
    return Candidate(_source_key(path), "not_a_file", "neither a regular file nor a directory")


def walk_inputs(inputs: Sequence[str], extensions: frozenset[str], exclude: Path | None = None) -> Iterator[Candidate]:
    """Files to curate, in order: named files as given, directories walked (sorted, symlinks followed once).

    In a directory only files with a video extension are taken; any other file is reported as
    skipped (``not_video_extension``), as are unreadable directories and broken links, so nothing
    in the inputs is left out silently. ``exclude`` (the output directory) is never entered.
    """
    seen_dirs: set[str] = set()
    excluded = os.path.realpath(exclude) if exclude is not None else None

    def walk(d: str) -> Iterator[Candidate]:
        real = os.path.realpath(d)
        if real in seen_dirs or real == excluded:
            return
        seen_dirs.add(real)
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Candidate(_source_key(d), "unreadable_directory", f"{type(e).__name__}: {e.strerror or e}")
            return
        for entry in entries:
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as e:
                yield Candidate(_source_key(entry.path), "unreadable_file", str(e))
                continue
            if is_dir:
                yield from walk(entry.path)
            elif not is_file:
                yield _not_a_file(entry.path)
            elif entry.name.rsplit(".", 1)[-1].lower() in extensions and "." in entry.name:
                yield Candidate(_source_key(entry.path))
            else:
                yield Candidate(_source_key(entry.path), "not_video_extension",
                                f"extension not in config.inputs.extensions: {display_path(entry.name)}")

    for path in inputs:
        if not os.path.lexists(path):
            yield Candidate(_source_key(path), "missing", "no such file or directory")
        elif os.path.isdir(path):
            yield from walk(path)
        elif os.path.isfile(path):
            yield Candidate(_source_key(path))
        else:
            yield _not_a_file(path)
