"""Reading the user's keyframe images and conditioning videos at the size a request asks for."""

from __future__ import annotations

import hashlib
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


def read_image(path: str, height: int, width: int, *, resize: bool, what: str = "--keyframe") -> np.ndarray:
    """An RGB image as uint8 (H, W, 3) at exactly height x width (resized only with ``resize``)."""
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"{what} image {path} does not exist.")
    try:
        with Image.open(p) as img:
            img.load()
            pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise GenerateError(f"{what} image {path} could not be read as an image ({e}).") from None
    h, w = pixels.shape[:2]
    if (h, w) != (height, width):
        if not resize:
            raise GenerateError(f"{what} image {path} is {w}x{h} (width x height) but the video is {width}x{height}: "
                            "pass images of that size, or --resize to resize them (bicubic), or set --width/--height.")
        pixels = resized(pixels, height, width)
    return pixels


def read_video(path: str, height: int, width: int, *, resize: bool) -> np.ndarray:
    """A video file's frames as uint8 (n, H, W, 3)."""
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"--video file {path} does not exist.")
    try:
        with av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise GenerateError(f"--video file {path} could not be decoded as a video ({e}).") from None
    if not frames:
        raise GenerateError(f"--video file {path} holds no frames.")
    h, w = frames[0].shape[:2]
    if (h, w) != (height, width):
        if not resize:
            raise GenerateError(f"--video file {path} is {w}x{h} (width x height) but the video is {width}x{height}: "
                            "pass a video of that size, or --resize to resize it (bicubic).")
        frames = [resized(f, height, width) for f in frames]
    return np.stack(frames)
