"""Video super-resolution benchmark folders (UDM10, SPMCS, Vid4, REDS4, YouHQ40) -> windows of uint8 frames.

Layouts, tried in this order (``DIR`` is ``--config.data``):

(a) ``DIR/<GT|HR|gt|hr|truth>/SEQ/*.png|jpg`` (Vid4, UDM10, REDS4 and YouHQ40 as distributed with
    BasicSR / Upscale-A-Video), with the low-res frames optionally beside it in
    ``DIR/<LR|LRx4|BIx4|BDx4|LQ|lr|lq|input4>/SEQ/*`` under the same file names (extensions may
    differ). ``hr_dir`` / ``lr_dir`` name other folders (relative to ``DIR``, e.g. REDS's
    ``train_sharp`` and ``train_sharp_bicubic/X4``); where several LR folders exist (Vid4 ships
    BIx4 and BDx4) ``lr_dir`` must choose one.
(b) SPMCS style ``DIR/SEQ/truth/*.png`` with optional ``DIR/SEQ/input4/*.png``.
(c) ``DIR/SEQ/*.png``: high-res frames only.

Sequences are sorted by name and frames by file name, both naturally (``frame2`` before
``frame10``). When no LR frames are given (or ``lr_given`` is off) they are made by the **BI**
degradation: the HR frame cropped (top left, as BasicSR's ``mod_crop``) to a multiple of the scale,
then downscaled by Pillow's BICUBIC on uint8 RGB (antialiased, as MATLAB's ``imresize``). The
**BD** degradation (Gaussian blur sigma 1.6, then every scale-th pixel) is not remade here: those
benchmarks ship it as files (UDM10, Vid4's BDx4), read through layout (a).

Given LR frames must be ``floor(H / scale) x floor(W / scale)`` of their HR frames. Both are then
center-cropped on the low-res grid to a multiple of ``lr_multiple`` (so the high-res crop, ``scale``
times it, is a size the SR model accepts: a multiple of the VAE's spatial factor times the DiT patch)
and the HR frames to exactly ``scale`` times that crop at the matching offset.

A sequence is cut into consecutive windows of ``frames`` frames; a remainder of at least
``min_frames`` is a shorter last window, a shorter one is dropped and listed in ``skipped`` with its
reason, as is a sequence too short or too small. Bad input (an empty folder, frames of mixed sizes,
LR frames of the wrong size, an unreadable image) is a ``ValueError`` of one line naming the sequence.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

HR_DIRS = ("GT", "HR", "gt", "hr", "truth")
LR_DIRS = ("LR", "LRx4", "BIx4", "BDx4", "LQ", "lr", "lq", "input4")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LAYOUTS = "DIR/GT/SEQ/*.png (+ DIR/LR/SEQ/*), DIR/SEQ/truth/*.png (+ input4/), or DIR/SEQ/*.png"


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``frame2`` < ``frame10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t)


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header; a ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return h, w


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one frame file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def bicubic_downscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """The BI degradation of uint8 (T, H, W, 3): crop to a multiple of ``scale`` (top left), Pillow BICUBIC down."""
    t, h, w, _ = frames.shape
    h, w = h // scale * scale, w // scale * scale
    return np.stack([np.asarray(Image.fromarray(f[:h, :w]).resize((w // scale, h // scale), Image.Resampling.BICUBIC))
                     for f in frames]) if t else np.zeros((0, h // scale, w // scale, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class SequenceFiles:
    """One benchmark sequence: its frame files (HR, and LR where given) and their sizes."""

    name: str
    hr: tuple[Path, ...]
    lr: tuple[Path, ...] | None
    hr_size: tuple[int, int]
    lr_size: tuple[int, int]  # given, or what the BI degradation makes


@dataclasses.dataclass(frozen=True)
class Benchmark:
    root: Path
    layout: str  # "a", "b" or "c"
    hr_dir: str  # relative to root ("" for layout c; "SEQ/truth" for b)
    lr_dir: str | None  # None: LR made by the BI degradation
    scale: int
    sequences: tuple[SequenceFiles, ...]


def _one_size(name: str, files: Sequence[Path], what: str) -> tuple[int, int]:
    if not files:
        raise ValueError(f"sequence {name!r} has no {what} frames ({', '.join(IMAGE_SUFFIXES)}).")
    first = image_size(files[0])
    for f in files[1:]:
        size = image_size(f)
        if size != first:
            raise ValueError(f"sequence {name!r} has {what} frames of mixed sizes: {files[0].name} is "
                             f"{first[1]}x{first[0]} but {f.name} is {size[1]}x{size[0]} (width x height).")
    return first


def _pick(root: Path, given: str, names: Sequence[str], what: str, flag: str) -> Path | None:
    if given:
        p = root / given
        if not p.is_dir():
            raise ValueError(f"{flag}={given!r}: {p} is not a folder.")
        return p
    found = [root / n for n in names if (root / n).is_dir()]
    if len(found) > 1 and what == "LR":
        raise ValueError(f"{root} holds several LR folders {[p.name for p in found]}: choose one with {flag}.")
    return found[0] if found else None


def _sequence_dirs(root: Path, hr_dir: str, lr_dir: str, use_lr: bool
                   ) -> tuple[str, str, str | None, list[tuple[str, Path, Path | None]]]:
    """(layout, hr_dir, lr_dir, [(name, HR folder, LR folder or None)])."""
    hr = _pick(root, hr_dir, HR_DIRS, "HR", "--config.hr_dir")
    if hr is not None:
        lr = _pick(root, lr_dir, LR_DIRS, "LR", "--config.lr_dir") if use_lr else None
        seqs = [(p.name, p, (lr / p.name) if lr is not None else None) for p in _subdirs(hr)]
        if lr is not None:
            missing = [n for n, _, d in seqs if not d.is_dir()]
            if missing:
                raise ValueError(f"sequence {missing[0]!r} has HR frames in {hr} but no LR folder {lr / missing[0]}.")
        return "a", hr.relative_to(root).as_posix(), None if lr is None else lr.relative_to(root).as_posix(), seqs
    if lr_dir:
        raise ValueError(f"--config.lr_dir={lr_dir!r} needs the HR folder beside it: none of {HR_DIRS} is in {root} "
                         "(or set --config.hr_dir).")
    dirs = _subdirs(root)
    if dirs and any((d / "truth").is_dir() for d in dirs):
        seqs = []
        for d in dirs:
            if not (d / "truth").is_dir():
                raise ValueError(f"sequence {d.name!r} has no truth/ folder (SPMCS layout: {root}/SEQ/truth/*.png).")
            lr = next((d / n for n in LR_DIRS if (d / n).is_dir()), None) if use_lr else None
            seqs.append((d.name, d / "truth", lr))
        lr_name = next((p.name for _, _, p in seqs if p is not None), None)
        return "b", "SEQ/truth", None if lr_name is None else f"SEQ/{lr_name}", seqs
    return "c", "", None, [(d.name, d, None) for d in dirs]


def scan_benchmark(root: str | Path, *, scale: int | None, hr_dir: str = "", lr_dir: str = "", use_lr: bool = True,
                   sequences: Sequence[str] = ()) -> Benchmark:
    """The benchmark's sequences and sizes, from file headers (no frame decoded); ``ValueError`` on bad input.

    ``scale`` None: inferred from the LR frames (a ValueError when there are none). ``sequences``:
    only these names (each must exist).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"the benchmark folder {root} does not exist (layouts: {LAYOUTS}).")
    layout, hr_rel, lr_rel, dirs = _sequence_dirs(root, hr_dir, lr_dir, use_lr)
    if not dirs:
        raise ValueError(f"{root} holds no sequences: expected {LAYOUTS}.")
    if sequences:
        names = [n for n, _, _ in dirs]
        unknown = [s for s in sequences if s not in names]
        if unknown:
            raise ValueError(f"--config.sequences names {unknown}, not in {root} (which has {names}).")
        dirs = [d for d in dirs if d[0] in sequences]
    out = []
    for name, hr_folder, lr_folder in dirs:
        hr_files = _images(hr_folder)
        hr_size = _one_size(name, hr_files, "HR")
        lr_files = None
        if lr_folder is not None:
            by_stem = {p.stem: p for p in _images(lr_folder)}
            missing = [p.name for p in hr_files if p.stem not in by_stem]
            if missing:
                raise ValueError(f"sequence {name!r}: HR frame {missing[0]} has no LR frame of that name in "
                                 f"{lr_folder} ({len(missing)} missing).")
            lr_files = tuple(by_stem[p.stem] for p in hr_files)
            lr_size = _one_size(name, lr_files, "LR")
            if scale is None:
                if hr_size[0] % lr_size[0] or hr_size[0] // lr_size[0] != hr_size[1] // max(lr_size[1], 1):
                    raise ValueError(f"sequence {name!r}: HR {hr_size[1]}x{hr_size[0]} is not a whole multiple of LR "
                                     f"{lr_size[1]}x{lr_size[0]}: set --config.scale.")
                scale = hr_size[0] // lr_size[0]
            expected = (hr_size[0] // scale, hr_size[1] // scale)
            if lr_size != expected:
                raise ValueError(f"sequence {name!r}: LR frames are {lr_size[1]}x{lr_size[0]} but the {hr_size[1]}x"
                                 f"{hr_size[0]} HR frames at scale {scale} need {expected[1]}x{expected[0]} "
                                 "(width x height).")
        elif scale is None:
            raise ValueError(f"sequence {name!r} has no LR frames, so the scale is unknown: set --config.scale or "
                             "--config.model_config (an SR config or run).")
        else:
            lr_size = (hr_size[0] // scale, hr_size[1] // scale)
        out.append(SequenceFiles(name, tuple(hr_files), lr_files, hr_size, lr_size))
    return Benchmark(root, layout, hr_rel, lr_rel, int(scale), tuple(out))


# ------------------------------------------------------------------------------------------------
# Windows


def anchor_frames(spec: Sequence[str], length: int) -> tuple[int, ...]:
    """Anchor frame indices of a window of ``length`` frames: ``"#k"`` (dropped when k >= length), ``"last"``,
    ``"every:N"`` (0, N, 2N, ...). A ValueError for anything else."""
    out = set()
    for entry in spec:
        text = str(entry).strip()
        if text == "last":
            out.add(length - 1)
        elif text.startswith("#") and text[1:].isdigit():
            if int(text[1:]) < length:
                out.add(int(text[1:]))
        elif text.startswith("every:") and text[6:].isdigit() and int(text[6:]) > 0:
            out.update(range(0, length, int(text[6:])))
        else:
            raise ValueError(f"anchor {entry!r}: give '#k' (frame k of the window), 'last' or 'every:N'.")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Window:
    """Frames [start, start + length) of one sequence; ``index`` numbers windows over the whole benchmark."""

    index: int
    sequence: SequenceFiles
    start: int
    length: int
    crop_lr: tuple[int, int, int, int]  # (y0, x0, h, w) on the low-res grid
    anchors: tuple[int, ...]
    scale: int

    @property
    def crop_hr(self) -> tuple[int, int, int, int]:
        return tuple(v * self.scale for v in self.crop_lr)

    def describe(self) -> dict:
        return {"index": self.index, "sequence": self.sequence.name, "start": self.start, "frames": self.length,
                "anchors": list(self.anchors)}


def center_crop(lr_size: tuple[int, int], multiple: int) -> tuple[int, int, int, int] | None:
    """(y0, x0, h, w): the largest centered crop of ``lr_size`` with sides a multiple of ``multiple``; None if empty."""
    h, w = (s // multiple * multiple for s in lr_size)
    if not h or not w:
        return None
    return (lr_size[0] - h) // 2, (lr_size[1] - w) // 2, h, w


def plan_windows(bench: Benchmark, *, frames: int, min_frames: int, lr_multiple: int, anchors: Sequence[str] = (),
                 max_frames: int = 0, max_sequences: int = 0) -> tuple[list[Window], list[dict]]:
    """Every sequence cut into windows of ``frames`` (0: the whole sequence); the skipped parts with their reason.

    ``max_sequences`` / ``max_frames`` (0: no limit) keep the first sequences / the first frames of each.
    """
    windows, skipped = [], []
    seqs = bench.sequences[:max_sequences] if max_sequences else bench.sequences
    for seq in seqs:
        total = min(len(seq.hr), max_frames) if max_frames else len(seq.hr)
        box = center_crop(seq.lr_size, lr_multiple)
        if box is None:
            need = lr_multiple * bench.scale
            skipped.append({"sequence": seq.name, "start": 0, "frames": total,
                            "reason": f"frames of {seq.hr_size[1]}x{seq.hr_size[0]} are smaller than the {need} "
                                      "pixels a side the SR model needs"})
            continue
        length = frames or total
        for start in range(0, total, length):
            n = min(length, total - start)
            if n < min_frames:
                what = "sequence" if start == 0 else "remainder"
                skipped.append({"sequence": seq.name, "start": start, "frames": n,
                                "reason": f"{what} of {n} frames is shorter than the {min_frames}-frame minimum"})
                continue
            windows.append(Window(len(windows), seq, start, n, box, anchor_frames(anchors, n), bench.scale))
    return windows, skipped


def load_window(window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(HR (T, H, W, 3), LR (T, H / scale, W / scale, 3)) uint8 frames of the window, cropped."""
    seq, s = window.sequence, window.scale
    picked = slice(window.start, window.start + window.length)
    hr = np.stack([read_image(p) for p in seq.hr[picked]])
    for p, img in zip(seq.hr[picked], hr, strict=True):  # headers said one size; the pixels must agree
        if img.shape[:2] != seq.hr_size:
            raise ValueError(f"sequence {seq.name!r}: {p.name} decodes to {img.shape[1]}x{img.shape[0]}, its header "
                             f"said {seq.hr_size[1]}x{seq.hr_size[0]}.")
    lr = bicubic_downscale(hr, s) if seq.lr is None else np.stack([read_image(p) for p in seq.lr[picked]])
    y, x, h, w = window.crop_lr
    return hr[:, y * s:(y + h) * s, x * s:(x + w) * s], lr[:, y:y + h, x:x + w]


def lr_multiple(scale: int, unit: int) -> int:
    """The low-res side multiple whose ``scale`` times is a multiple of ``unit`` (high-res pixels)."""
    return unit // math.gcd(unit, scale)
