"""The files ``python -m director_jax.pytorch`` writes: OUT (.mp4 or .npy), OUT.png and OUT.json, as one unit.

As ``python -m director_jax.generate`` writes its set (``pipeline/generate.py``): the output location is
checked before any work (``check_output``); the three files are written into a staging directory beside
OUT and moved into place, OUT.json removed first and renamed last (``io_utils.publish_together``), under
the lock ``OUT.lock`` (``output_lock``: a second run to the same OUT is refused while one runs). OUT.png
is the contact sheet (generated and given rows, keyframes outlined); OUT.json the settings, plus the
names and SHA-256 of OUT and OUT.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from director_jax.errors import UserError
from director_jax.io_utils import (
    atomic_write,
    atomic_write_text,
    is_remote,
    publish_together,
)
from director_jax.pipeline.generate import output_lock as generate_output_lock
from director_jax.pipeline.media import sha256
from director_jax.video_io import check_finite, contact_sheet, write_mp4


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """OUT (.mp4 or .npy), OUT.png and OUT.json: the set, its manifest (the JSON) last."""
    path = Path(out)
    return path, path.with_suffix(".png"), path.with_suffix(".json")


def check_output(out: str) -> None:
    """A local .mp4 / .npy path whose directory exists (or can be created) and is writable; no file of the set
    (OUT, OUT.png, OUT.json, OUT.lock) is a directory. Nothing is created."""
    path = Path(out)
    if path.suffix not in (".mp4", ".npy") or not path.stem or path.name.startswith("."):
        raise UserError(f"--out {out}: give an .mp4 (H.264) or .npy (raw frames) path, e.g. out/video.mp4 (the "
                        "contact sheet and settings go beside it).")
    if is_remote(out):
        raise UserError(f"--out {out} is cloud storage: write to a local path and copy the files up afterwards.")
    for p in (*output_paths(out), Path(out + ".lock")):
        if p.is_dir():
            raise UserError(f"--out {out}: {p} is a directory; give a file path.")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not a writable directory.")


def output_lock(out: str) -> contextlib.AbstractContextManager[None]:
    """``generate``'s lock protocol on this command's file set (OUT, OUT.png, OUT.json)."""
    return generate_output_lock(out, output_paths(out), command="PyTorch run")


def write_outputs(out: str, frames: np.ndarray, *, fps: float, given: np.ndarray, keyframes: list[int],
                  settings: dict[str, Any]) -> dict:
    """OUT (.mp4 / .npy), OUT.png and OUT.json published as one unit; returns the settings written.

    ``frames`` and ``given`` are (T, H, W, 3) in [-1, 1] (the sheet's two rows), ``keyframes`` the frames outlined.
    OUT.json is ``settings`` plus ``files``: the names and SHA-256 of OUT and OUT.png. Call holding
    ``output_lock(out)``.
    """
    try:
        check_finite(frames)
    except ValueError as e:
        raise UserError(f"the PyTorch pipeline generated a video with NaN or infinite values ({e}): the weights or "
                        "the sampling settings (guidance, shift) are not usable; nothing was written.") from None
    settings = dict(settings)
    json.dumps(settings, allow_nan=False, default=str)  # ValueError on NaN before anything is written
    video, sheet, sidecar = output_paths(out)
    with publish_together([video, sheet, sidecar]) as staging:
        if video.suffix == ".npy":
            def save(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.save(f, frames)

            atomic_write(staging / video.name, save)
        else:
            write_mp4(staging / video.name, frames, fps)
        scale = max(1, math.ceil(64 / max(frames.shape[1:3])))
        contact_sheet(staging / sheet.name, [("generated", frames), ("given", given)], marked=keyframes, scale=scale)
        settings["files"] = {p.suffix[1:]: dict(name=p.name, sha256=sha256(staging / p.name)) for p in (video, sheet)}
        atomic_write_text(staging / sidecar.name, json.dumps(settings, indent=2, default=str, allow_nan=False) + "\n")
    return settings
