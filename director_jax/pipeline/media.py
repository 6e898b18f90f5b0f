"""Reading the user's keyframe images and conditioning videos at the size a request asks for.

Images are read faithfully or refused: 8-bit modes (RGB, RGBA, palette, grayscale, ...) through Pillow's RGB
conversion; 16-bit integer images (PNG's ``I;16`` / ``I``) scaled by their type's maximum and float images (TIFF's
``F``) clipped to [0, 1], instead of Pillow's clipping to 0..255 (white or black); images larger than Pillow's
decompression-bomb limit refused before they are decoded.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from director_jax.errors import GenerateError


def sha256(path: str | Path) -> str:
    """The file's SHA-256, recorded in a run's settings so its inputs can be identified later."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the models' pixel range."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 (H, W, 3) frame resized (bicubic) to height x width."""
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


# Pillow modes of one channel wider than 8 bits -> the value of full white in them.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _rgb8(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) of an opened image, with the real range of 16-bit and float images."""
    mode = img.mode
    if mode in _WIDE_MODES or mode in ("I", "F"):
        values = np.asarray(img).astype(np.float64)
        if mode == "F":
            if not np.isfinite(values).all():
                raise ValueError("the float image holds NaN or infinite values")
            unit = values  # float images hold 0..1
        elif mode == "I" and img.format != "PNG":
            unit = values / float(np.iinfo(np.int32).max)  # a 32-bit integer image (TIFF)
        else:
            unit = values / float(_WIDE_MODES.get(mode, 65535))  # 16-bit (PNG's 16-bit grey opens as I or I;16)
        grey = np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def read_image(path: str, height: int, width: int, *, resize: bool, what: str = "--keyframe") -> np.ndarray:
    """An RGB image as uint8 (H, W, 3) at exactly height x width (resized only with ``resize``)."""
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"{what} image {path} does not exist.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                pixels = _rgb8(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise GenerateError(f"{what} image {path} is too large to decode safely ({_one_line(e)}): give an image "
                            f"of at most {Image.MAX_IMAGE_PIXELS} pixels, e.g. at the video's size "
                            f"{width}x{height}.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise GenerateError(f"{what} image {path} could not be read as an image ({_one_line(e)}).") from None
    h, w = pixels.shape[:2]
    if (h, w) != (height, width):
        if not resize:
            raise GenerateError(f"{what} image {path} is {w}x{h} (width x height) but the video is {width}x{height}: "
                            "pass images of that size, or --resize to resize them (bicubic), or set --width/--height.")
        pixels = resized(pixels, height, width)
    return pixels


def read_video(path: str, height: int, width: int, *, resize: bool, max_frames: int | None = None,
               max_frame_pixels: int | None = None) -> np.ndarray:
    """A video file's frames as uint8 (n, H, W, 3).

    ``max_frames``: a video with more frames is refused as soon as its ``max_frames + 1``-th frame is decoded
    (no need to decode an hour of video to say it is too long); ``max_frame_pixels``: one with larger frames is
    refused before decoding.
    """
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"--video file {path} does not exist.")
    frames = []
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if max_frame_pixels is not None and w * h > max_frame_pixels:
                raise GenerateError(f"--video file {path} has {w}x{h} frames, over the {max_frame_pixels} pixels a "
                                    "frame may have: give a video at the generated size.")
            for f in container.decode(stream):
                frames.append(f.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) > max_frames:
                    raise GenerateError(f"--video file {path} has more than {max_frames} frames, the length of the "
                                        "video to generate: lengthen the video (--duration/--frames) or cut the "
                                        "clip.")
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        if isinstance(e, GenerateError):
            raise
        raise GenerateError(f"--video file {path} could not be decoded as a video ({_one_line(e)}).") from None
    if not frames:
        raise GenerateError(f"--video file {path} holds no frames.")
    h, w = frames[0].shape[:2]
    if (h, w) != (height, width):
        if not resize:
            raise GenerateError(f"--video file {path} is {w}x{h} (width x height) but the video is {width}x{height}: "
                            "pass a video of that size, or --resize to resize it (bicubic).")
        frames = [resized(f, height, width) for f in frames]
    return np.stack(frames)
