"""Streaming video decode with PyAV: frames one at a time, so memory never grows with a movie's length.

Every failure a file can cause while being opened or read (zero bytes, not a video, a still image,
corrupt or truncated data) becomes a ``VideoReadError`` whose ``reason`` is a short label (counted
in the curation summary) and whose message names the file and what went wrong, so a curation run
can skip the file, record why and go on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoReadError(RuntimeError):
    """A file could not be read as a video; ``reason`` is a short label for summaries."""

    def __init__(self, path: str | os.PathLike, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream."""

    path: str
    fps: float
    rate: Fraction  # the exact frame rate (24000/1001, ...), for encoders
    num_frames: int  # from the container (exact for mp4); 0 when the container does not say
    width: int
    height: int
    codec: str


_STILL_IMAGE_FORMATS = {"image2", "gif", "apng", "webp"}


def _open(path: str | os.PathLike):
    import av

    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as e:
        kind = "broken_symlink" if p.is_symlink() else "missing"
        raise VideoReadError(path, kind, "no such file") from e
    except OSError as e:
        raise VideoReadError(path, "unreadable_file", f"{type(e).__name__}: {e}") from e
    if not p.is_file():
        raise VideoReadError(path, "not_a_file")
    if st.st_size == 0:
        raise VideoReadError(path, "empty_file", "0 bytes")
    try:
        container = av.open(str(p))
    except PermissionError as e:
        raise VideoReadError(path, "unreadable_file", str(e)) from e
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as e:
        # Not a container FFmpeg knows, or an mp4 cut off before its index (moov atom).
        raise VideoReadError(path, "unreadable_container", f"{type(e).__name__}: {e}") from e
    fmt = container.format.name
    if fmt in _STILL_IMAGE_FORMATS or fmt.endswith("_pipe"):
        container.close()
        raise VideoReadError(path, "still_image", f"format {fmt}")
    if not container.streams.video:
        container.close()
        raise VideoReadError(path, "no_video_stream", f"format {fmt}, streams: {list(container.streams)}")
    return container


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(0)


def _info(path, container) -> VideoInfo:
    s = container.streams.video[0]
    rate = _rate(s)
    if rate <= 0:
        raise VideoReadError(path, "no_frame_rate", "the stream states no frame rate")
    width, height = s.codec_context.width, s.codec_context.height
    if width <= 0 or height <= 0:
        raise VideoReadError(path, "no_frame_size", "the stream states no frame size")
    return VideoInfo(str(path), float(rate), rate, int(s.frames or 0), width, height, s.codec_context.name)


def probe(path: str | os.PathLike) -> VideoInfo:
    """Container metadata of the first video stream, without decoding."""
    container = _open(path)
    try:
        return _info(path, container)
    finally:
        container.close()


def fit_size(width: int, height: int, *, max_short_side: int | None = None, max_width: int | None = None,
             even: bool = False) -> tuple[int, int]:
    """(width, height) scaled down (never up, aspect kept) so the limits hold; ``even`` for yuv420p."""
    scale = 1.0
    if max_short_side:
        scale = min(scale, max_short_side / min(width, height))
    if max_width:
        scale = min(scale, max_width / width)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if even:
        w, h = max(2, w - w % 2), max(2, h - h % 2)
    return w, h


def iter_video_frames(path: str | os.PathLike, *, stop: int | None = None, check_length: bool = True):
    """The decoded ``av.VideoFrame`` objects in order (for callers that reformat in C, e.g. encoders).

    Raises ``VideoReadError``: ``decode_error`` when the stream breaks off with an error, and
    ``truncated`` when it ends silently before the frame count the container states (a file cut
    short with its index intact), after the frames it did yield.
    """
    import av

    container = _open(path)
    index = 0
    try:
        info = _info(path, container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if stop is not None and stop <= 0:
                return
            for frame in container.decode(stream):
                yield frame
                index += 1
                if stop is not None and index >= stop:
                    return
        except (av.error.FFmpegError, OSError) as e:
            raise VideoReadError(path, "decode_error", f"after {index} frames: {type(e).__name__}: {e}") from e
    finally:
        container.close()
    if index == 0:
        raise VideoReadError(path, "no_frames", "the stream decodes to no frames")
    if stop is not None and index < stop:
        raise VideoReadError(path, "truncated", f"{index} frames decoded, {stop} wanted")
    expected = info.num_frames
    if check_length and stop is None and expected and expected - index > max(2, expected // 200):
        raise VideoReadError(path, "truncated", f"the container states {expected} frames but only {index} decode")


def iter_frames(path: str | os.PathLike, *, size: tuple[int, int] | None = None, format: str = "rgb24",
                stop: int | None = None, check_length: bool = True) -> Iterator[np.ndarray]:
    """Frames as uint8 ``(H, W, 3)`` arrays (``format`` rgb24 or bgr24), decoded one at a time.

    ``size=(height, width)`` resizes each frame as it is decoded (area averaging in swscale), which
    is how the shot detector gets its small analysis frames without ever holding a full-size one.
    """
    for frame in iter_video_frames(path, stop=stop, check_length=check_length):
        yield to_array(frame, size=size, format=format)


def to_array(frame, *, size: tuple[int, int] | None = None, format: str = "rgb24") -> np.ndarray:
    """One ``av.VideoFrame`` -> uint8 ``(H, W, 3)``, resized to ``size=(height, width)`` if given."""
    if size is None or (frame.height, frame.width) == tuple(size):
        return frame.to_ndarray(format=format)
    return frame.to_ndarray(format=format, width=size[1], height=size[0], interpolation="AREA")


def read_frames(path: str | os.PathLike, **kwargs) -> np.ndarray:
    """All frames (or the first ``stop``) stacked: ``(T, H, W, 3)`` uint8. For short clips only."""
    return np.stack(list(iter_frames(path, **kwargs)))


def decode_bytes(data: bytes, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """A whole encoded clip held in memory -> ``(T, H, W, 3)`` uint8 RGB."""
    import io

    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            frames = [to_array(f, size=size) for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as e:
        raise VideoReadError("<bytes>", "decode_error", f"{type(e).__name__}: {e}") from e
    if not frames:
        raise VideoReadError("<bytes>", "no_frames")
    return np.stack(frames)
