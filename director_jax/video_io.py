"""Writing results people look at: H.264 mp4 files and PNG contact sheets (atomic writes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from director_jax.io_utils import atomic_write


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[-1, 1] float frames -> uint8 RGB."""
    return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB (H, W even) -> the (3H/2, W) planar yuv420p frame H.264 decoders read: BT.601
    limited range (what players assume for untagged video), chroma the mean of each 2x2 block, rounded."""
    x = rgb.astype(np.float64)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape

    def half(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), half(cb).reshape(-1), half(cr).reshape(-1)]
    out = np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8)
    return out.reshape(h * 3 // 2, w)


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames if scale == 1 else frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def mp4_rate(fps: float) -> int | Fraction:
    """The stream rate of ``fps`` frames per second: a whole number, or the nearest fraction with a denominator of
    at most 1001 (23.976 -> 2997/125, NTSC's 30000/1001 exactly); PyAV takes no plain float."""
    value = float(fps)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"fps={fps}: a frame rate is a positive finite number.")
    if value.is_integer():
        return int(value)
    rate = Fraction(value).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps={fps}: too low for an mp4 stream (at least 1/1001).")
    return rate


def check_finite(frames: np.ndarray, what: str = "the frames") -> None:
    """A ``ValueError`` naming how many values are NaN / infinite: a video file never silently holds them."""
    bad = int(np.size(frames) - np.count_nonzero(np.isfinite(frames)))
    if bad:
        raise ValueError(f"{what} hold {bad} NaN or infinite values of {np.size(frames)}")


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, scale: int = 1, crf: int = 16) -> Path:
    """Writes (T, H, W, 3) frames in [-1, 1] as an H.264 mp4 (sizes rounded up to even by padding).

    Frames with NaN / infinite values and frame rates PyAV cannot store are refused (``ValueError``) before
    anything is written.
    """
    import av

    check_finite(frames, f"the frames for {path}")
    rate = mp4_rate(fps)
    pixels = _upscale(to_uint8(frames), scale)
    t, h, w, _ = pixels.shape
    pixels = np.pad(pixels, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = pixels.shape[2], pixels.shape[1]
            stream.pix_fmt = "yuv420p"
            # no lookahead (mbtree, adaptive B-frames, scene cuts, weighted prediction all read it): with it, two
            # encodes of the same frames in one process differed (x264's low-resolution lookahead planes of small
            # frames), which breaks "same seed, same file"
            stream.options = {"crf": str(crf), "x264-params": "rc-lookahead=0:mbtree=0:b-adapt=0:scenecut=0:weightp=0"}
            # one encoder thread: x264's output then depends on the frames only (with the thread count chosen from
            # the machine's load, two encodes of the same frames differed in 10% of their pixels)
            stream.codec_context.thread_count = 1
            stream.codec_context.time_base = Fraction(1, 1) / rate
            for index, frame in enumerate(pixels):
                # converted here (the encoder's input is then the frames' alone), with explicit timestamps
                video_frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
                video_frame.pts = index
                video_frame.time_base = stream.codec_context.time_base
                for packet in stream.encode(video_frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    return atomic_write(path, write)


# Cut marks on contact sheets: a shot asked to start on a frame (cyan, in the frame-number strip and the gap to the
# frame's left through every row) and a cut found in one row's video (magenta, over that frame's left edge).
CUT_MARK = (0, 255, 255)
DETECTED_CUT_MARK = (255, 0, 255)


def _sheet_columns(num_frames: int, max_columns: int, marks: Sequence[int]) -> list[int]:
    """Evenly spaced frames plus every marked one; a cut also shows the frame before it (the shot it ends)."""
    step = max(1, -(-num_frames // max_columns))
    return sorted(set(range(0, num_frames, step)) | {m for m in marks if 0 <= m < num_frames})


def contact_sheet(path: str | os.PathLike,
                  rows: Sequence[tuple[str, np.ndarray] | tuple[str, np.ndarray, Sequence[int]]],
                  marked: Sequence[int] = (), scale: int = 2, max_columns: int = 24,
                  cuts: Sequence[int] = ()) -> Path:
    """A PNG grid: one row per labelled (T, H, W, 3) video, frames left to right.

    Frames listed in ``marked`` (keyframe positions) get a yellow border, so one can see at a
    glance that keyframes sit on the exact frames asked for. ``cuts`` (frames that start a shot, as
    asked) get a cyan bar above the first row and in the gap before the frame; a row given as
    ``(label, video, row_cuts)`` gets a magenta bar on the left edge of each frame in ``row_cuts``
    (the cuts found in that video), so asked and found cuts can be told apart. Every marked frame
    and the frame before each cut is shown, whatever ``max_columns`` says.
    """
    from PIL import Image, ImageDraw

    for label, video, *_ in rows:
        check_finite(video, f"the {label!r} row of {path}")
    num_frames = rows[0][1].shape[0]
    row_cuts = [set(int(c) for c in row[2]) if len(row) > 2 else set() for row in rows]
    cut_set = {int(c) for c in cuts}
    all_cuts = cut_set.union(*row_cuts)
    columns = _sheet_columns(num_frames, max_columns, [*marked, *all_cuts, *(c - 1 for c in all_cuts)])
    h, w = rows[0][1].shape[1] * scale, rows[0][1].shape[2] * scale
    label_w, pad = 110, 3
    sheet = Image.new("RGB", (label_w + len(columns) * (w + pad), 16 + len(rows) * (h + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for ci, f in enumerate(columns):
        x = label_w + ci * (w + pad)
        if f in cut_set:
            draw.rectangle([x, 0, x + 3, 14], fill=CUT_MARK)
            draw.rectangle([x - pad, 16, x - 2, sheet.height - 1], fill=CUT_MARK)
        draw.text((x + (6 if f in cut_set else 0), 2), f"#{f}",
                  fill=(255, 220, 0) if f in marked else (200, 200, 200))
    for ri, (label, video, *_) in enumerate(rows):
        y = 16 + ri * (h + pad)
        draw.text((4, y + h // 2 - 6), label[:16], fill=(230, 230, 230))
        pixels = _upscale(to_uint8(video), scale)
        for ci, f in enumerate(columns):
            x = label_w + ci * (w + pad)
            sheet.paste(Image.fromarray(pixels[f]), (x, y))
            if f in marked:
                draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(255, 220, 0), width=2)
            if f in row_cuts[ri]:
                draw.rectangle([x, y, x + 3, y + h - 1], fill=DETECTED_CUT_MARK)
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
