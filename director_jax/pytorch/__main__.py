"""``python -m director_jax.pytorch``: a Director-Gen video in PyTorch from exported weights (no JAX model).

    python -m director_jax.pytorch --vae out/vae --transformer out/dit --text_embeddings text.npy \\
        --keyframe a.png@#0 --keyframe b.png@#18 --frames 19 --seed 0 --steps 50 --out video.mp4

``--vae`` and ``--transformer`` are the directories ``python -m director_jax.convert export`` writes.
``--keyframe PATH@TIME`` (repeated; TIME in seconds, ``1.5`` or ``1.5s``, or a frame, ``#12``) puts
the keyframes on the timeline; they are resized (bicubic) to ``--height`` x ``--width``, by default
the first keyframe's size. ``--text_embeddings`` is a ``.npy`` of caption embeddings (Lt, D) or
(1, Lt, D) (``--negative_embeddings`` likewise, needed for ``--guidance_scale`` other than 1). The
initial noise is ``jax.random.key(--seed)``'s, the tensor the JAX pipeline draws, or ``--noise``
(a ``.npy`` of (1, L, h, w, z)). ``--out`` is an ``.mp4`` (H.264) or ``.npy`` (frames in [-1, 1]).
Every input is checked before the models load; a bad one is one line ``error: ...``, exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from director_jax import cli
from director_jax.io_utils import atomic_write
from director_jax.models.timeline import Timeline, TimelineLayout, frame_at_time, place_given_frames
from director_jax.pipeline.media import read_image, to_float
from director_jax.pipeline.request import split_at
from director_jax.pytorch.pipeline import TorchDirectorPipeline, jax_noise, noise_shape
from director_jax.video_io import write_mp4

_VAE = flags.DEFINE_string("vae", None, "Exported diffusers AutoencoderKLWan directory.")
_TRANSFORMER = flags.DEFINE_string("transformer", None, "Exported Director-Gen transformer directory.")
_KEYFRAME = flags.DEFINE_multi_string("keyframe", [], "PATH@TIME: PATH@#FRAME or PATH@SECONDS (repeat).")
_FRAMES = flags.DEFINE_integer("frames", None, "Pixel frames of the video.")
_FPS = flags.DEFINE_float("fps", 16.0, "Frames per second (keyframe times in seconds; the mp4's rate).")
_HEIGHT = flags.DEFINE_integer("height", None, "Video height (with --width; default: the first keyframe's).")
_WIDTH = flags.DEFINE_integer("width", None, "Video width (with --height; default: the first keyframe's).")
_TEXT = flags.DEFINE_string("text_embeddings", None, ".npy caption embeddings (Lt, D) or (1, Lt, D).")
_NEGATIVE = flags.DEFINE_string("negative_embeddings", None, ".npy negative caption embeddings (for CFG).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance scale (1: off).")
_KEYFRAME_GUIDANCE = flags.DEFINE_float("keyframe_guidance", 1.0, "Keyframe guidance scale (1: off).")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps.")
_SAMPLER = flags.DEFINE_enum("sampler", "unipc", ["unipc", "euler"], "diffusers' scheduler.")
_SHIFT = flags.DEFINE_float("shift", 5.0, "Flow shift of the sigma schedule.")
_SEED = flags.DEFINE_integer("seed", 0, "jax.random.key(seed) noise: the JAX pipeline's.")
_NOISE = flags.DEFINE_string("noise", None, ".npy initial noise (1, L, h, w, z) instead of --seed.")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device, e.g. cpu or cuda.")
_OUT = flags.DEFINE_string("out", None, "Output .mp4, or .npy for the raw frames in [-1, 1].")

REQUIRED = {"--vae": _VAE, "--transformer": _TRANSFORMER, "--keyframe": _KEYFRAME, "--frames": _FRAMES,
            "--text_embeddings": _TEXT, "--out": _OUT}


@dataclasses.dataclass
class Inputs:
    """The command's inputs, checked and read: everything but the models."""

    layout: TimelineLayout
    video: np.ndarray  # (1, T, H, W, 3) in [-1, 1], the keyframes on their frames
    keyframes: list[int]
    text: np.ndarray  # (1, Lt, D)
    negative: np.ndarray | None
    noise: np.ndarray  # (1, L, h, w, z)


def _read_config(directory: str, flag: str) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise cli.UserError(f"{flag} {directory}: no config.json there (give a directory written by "
                            "`python -m director_jax.convert export`).")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{flag} {directory}: config.json could not be read ({e}).") from None


def _finite(flag: str, value: float, *, positive: bool = False) -> float:
    if not math.isfinite(value) or (positive and value <= 0):
        raise cli.UserError(f"{flag} {value}: give a finite{' positive' if positive else ''} number.")
    return value


def _read_npy(path: str, flag: str) -> np.ndarray:
    if not Path(path).is_file():
        raise cli.UserError(f"{flag} {path} does not exist.")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{flag} {path} is not a NumPy .npy array ({e}).") from None
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise cli.UserError(f"{flag} {path} must hold finite numbers.")
    return array.astype(np.float32)


def _embeddings(path: str, flag: str, text_dim: int) -> np.ndarray:
    e = _read_npy(path, flag)
    e = e[None] if e.ndim == 2 else e
    if e.ndim != 3 or e.shape[0] != 1 or e.shape[-1] != text_dim:
        raise cli.UserError(f"{flag} {path} has shape {e.shape}: give (Lt, {text_dim}) or (1, Lt, {text_dim}) "
                            "(the transformer's text_dim).")
    return e


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of the keyframe image at ``path``."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise cli.UserError(f"--keyframe image {path} does not exist.")
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise cli.UserError(f"--keyframe image {path} could not be read as an image ({e}).") from None


def _check_out(out: str) -> None:
    if Path(out).suffix not in (".mp4", ".npy"):
        raise cli.UserError(f"--out {out}: give an .mp4 (H.264) or .npy (raw frames) path.")
    if Path(out).is_dir():
        raise cli.UserError(f"--out {out} is a directory; give a file path.")
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UserError(f"--out {out}: {parent} is not a writable directory.")


def check_inputs() -> Inputs:
    """Every flag checked, the keyframes, embeddings and noise read: before any model loads."""
    missing = [flag for flag, holder in REQUIRED.items() if holder.value in (None, [])]
    if missing:
        raise cli.UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help).")
    vae_cfg = _read_config(_VAE.value, "--vae")
    dit_cfg = _read_config(_TRANSFORMER.value, "--transformer")
    z_dim = int(vae_cfg.get("z_dim", 16))
    if dit_cfg.get("in_channels") != z_dim or dit_cfg.get("out_channels") != z_dim:
        raise cli.UserError(f"--transformer {_TRANSFORMER.value} has in/out channels {dit_cfg.get('in_channels')}/"
                            f"{dit_cfg.get('out_channels')}, the VAE's latents {z_dim}: give a Director-Gen "
                            "transformer exported with this VAE.")
    frames = _FRAMES.value
    if frames < 1:
        raise cli.UserError(f"--frames {frames}: give at least 1.")
    fps = _finite("--fps", _FPS.value, positive=True)
    _finite("--shift", _SHIFT.value, positive=True)
    guidance = _finite("--guidance_scale", _GUIDANCE.value)
    _finite("--keyframe_guidance", _KEYFRAME_GUIDANCE.value)
    if _STEPS.value < 1:
        raise cli.UserError(f"--steps {_STEPS.value}: give at least 1.")
    if guidance != 1.0 and not _NEGATIVE.value:
        raise cli.UserError(f"--guidance_scale {guidance} needs --negative_embeddings (the negative caption's).")
    _check_out(_OUT.value)

    specs = [split_at(spec, "--keyframe") for spec in _KEYFRAME.value]
    try:
        times = [frame_at_time(when, fps, frames) for _, when in specs]
    except ValueError as e:
        raise cli.UserError(f"--keyframe: {e}") from None
    if (_HEIGHT.value is None) != (_WIDTH.value is None):
        raise cli.UserError("give --height and --width together (or neither: the first keyframe's size).")
    if _HEIGHT.value is None:
        height, width = _image_size(specs[0][0])
    else:
        height, width = _HEIGHT.value, _WIDTH.value
    spatial = int(vae_cfg.get("scale_factor_spatial", 8))
    patch = dit_cfg.get("patch_size", (1, 2, 2))
    fh, fw = spatial * int(patch[1]), spatial * int(patch[2])
    if height <= 0 or width <= 0 or height % fh or width % fw:
        raise cli.UserError(f"the video size {width}x{height} (width x height) must be a positive multiple of "
                            f"{fw}x{fh} (VAE x patch); set --height / --width.")
    try:
        layout = Timeline.from_keyframes(frames, times).layout
    except ValueError as e:
        raise cli.UserError(f"--keyframe: {e}") from None
    given = {}
    for (path, _), frame in zip(specs, times, strict=True):
        given[frame] = to_float(read_image(path, height, width, resize=True))
    text_dim = int(dit_cfg.get("text_dim", 4096))
    text = _embeddings(_TEXT.value, "--text_embeddings", text_dim)
    negative = _embeddings(_NEGATIVE.value, "--negative_embeddings", text_dim) if _NEGATIVE.value else None
    shape = noise_shape(layout, 1, height, width, z_dim, spatial)
    if _NOISE.value:
        noise = _read_npy(_NOISE.value, "--noise")
        if noise.shape != shape:
            raise cli.UserError(f"--noise {_NOISE.value} has shape {noise.shape}; this timeline and size need {shape}.")
    else:
        noise = jax_noise(_SEED.value, shape)
    return Inputs(layout, place_given_frames(frames, given)[None], times, text, negative, noise)


def _write(out: str, frames: np.ndarray, fps: float) -> None:
    Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    if out.endswith(".npy"):
        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, frames)

        atomic_write(out, save)
    else:
        write_mp4(out, frames, fps)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {' '.join(argv[1:])!r}: every input is a flag (see --help).")
    inputs = check_inputs()
    pipe = TorchDirectorPipeline.from_pretrained(_VAE.value, _TRANSFORMER.value, device=_DEVICE.value)
    video, _ = pipe(inputs.layout, inputs.video, inputs.text, inputs.noise, negative_text=inputs.negative,
                    steps=_STEPS.value, sampler=_SAMPLER.value, shift=_SHIFT.value,
                    guidance_scale=_GUIDANCE.value, keyframe_guidance=_KEYFRAME_GUIDANCE.value)
    _write(_OUT.value, video[0], _FPS.value)
    print(f"wrote {_OUT.value}: {_FRAMES.value} frames, keyframes at {inputs.keyframes}")
    print(inputs.layout.describe())


if __name__ == "__main__":
    cli.run(main)
