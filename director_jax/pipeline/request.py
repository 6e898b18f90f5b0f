"""A generation request and its plan: every input checked and read before any model is loaded.

``Request`` holds what the user asked for (the ``generate`` command's flags map one to one onto its
fields); ``plan`` turns it into a ``Plan``: the video's size, length and frame rate, the given
frames read and placed on their frames, and the ``Timeline`` they make. Any problem raises
``errors.GenerateError`` (one line that names the input and the fix) before anything is loaded or written.

Times are ``PATH@TIME``: seconds (``1.5`` or ``1.5s``) or a frame (``#12``); the last ``@`` splits,
so paths may contain ``@``. Conditioning videos start at a TIME or at ``end``.

The order of the checks: the output location first (an .mp4 path whose directory exists or can be created and
is writable), then every number (finite and in range, the sampler a known one), the memory budget (frames x
height x width, and the SR output's, against ``max_pixels``), the SR config, and last the files read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from director_jax.build import saved_config, step_directory, vae_config_from
from director_jax.build.reuse import is_trainer_run
from director_jax.data.captions import format_multishot_caption
from director_jax.errors import GenerateError, UserError
from director_jax.io_utils import is_remote, storage_path
from director_jax.models.timeline import Timeline, frame_at_time
from director_jax.pipeline.media import read_image, read_video, resized, sha256, to_float
from director_jax.pipeline.settings import SamplingSettings, sampling_settings

# The memory budget: frames x height x width of the video (and of the SR output) a request may ask for. 2**28
# pixels are ~3 GiB as float32 RGB on the host (and more in the VAE's activations): 81 frames of 1280x720 fit
# 3.5 times over, the README's examples by far. Raise it with --max_pixels (Request.max_pixels).
DEFAULT_MAX_PIXELS = 2**28
MAX_FPS, MIN_FPS = 1000.0, 0.01
MAX_SEED = 2**63 - 1
WEIGHTS = ("auto", "ema", "params")

@dataclasses.dataclass(frozen=True)
class Request:
    """Everything ``generate`` needs; the CLI flags map one to one onto these fields."""

    config: Any  # ml_collections.ConfigDict the checkpoint was trained with
    ckpt: str
    out: str
    keyframes: Sequence[str] = ()  # PATH@TIME
    videos: Sequence[str] = ()  # PATH@START
    duration: float | None = None
    frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    caption: str | None = None
    shot_captions: Sequence[str] = ()
    text_cache: str | None = None
    text_encoder: str | None = None  # umT5 weights (diffusers / HF / official layout): embed the caption in JAX
    tokenizer: str | None = None  # the encoder's tokenizer directory, when not beside its weights
    text_dtype: str = "bfloat16"
    mesh: str = "auto"  # "auto", "single" or sizes "fsdp=2,tensor=4": where the models' weights are sharded
    dtype: str = "auto"  # the models' weights and compute: "auto" (bfloat16 on TPU / GPU, float32 on CPU)
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    keyframe_guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    resize: bool = False
    step: int | None = None
    weights: str = "auto"
    sr: bool = False
    sr_ckpt: str | None = None
    sr_config: Any = None
    sr_steps: int | None = None
    progress: bool = True
    max_pixels: int | None = None  # the memory budget (frames x height x width); None: DEFAULT_MAX_PIXELS
    allow_config_mismatch: bool = False  # use --config even where it differs from the checkpoint's own
    config_path: str | None = None  # for the sidecar only
    sr_config_path: str | None = None
    argv: Sequence[str] | None = None  # the command line, for the sidecar only


@dataclasses.dataclass
class Plan:
    """Checked inputs: the timeline, the given frames and the sampling settings, before any model is loaded."""

    num_frames: int
    fps: float
    height: int
    width: int
    keyframes: list[dict]  # path, time, frame, seconds, sha256
    videos: list[dict]  # path, start, frame, length, sha256
    given: dict[int, np.ndarray]  # start frame -> (H, W, 3) or (n, H, W, 3) in [-1, 1] at the gen resolution
    full_res_keyframes: dict[int, np.ndarray]  # for --sr: keyframes at the SR output resolution
    caption: str | None
    timeline: Timeline
    sampling: SamplingSettings
    sr_scale: int = 1


def split_at(arg: str, what: str) -> tuple[str, str]:
    """``PATH@TIME`` -> (PATH, TIME); the last ``@`` splits, so paths may contain ``@``."""
    path, sep, when = str(arg).rpartition("@")
    if not sep or not path or not when.strip():
        example = "first.png@0, mid.png@1.5s or last.png@#16" if what == "--keyframe" else "clip.mp4@0 or clip.mp4@end"
        raise GenerateError(f"{what} {arg!r} is not PATH@TIME: write e.g. {example}.")
    return path, when.strip()


def frame_of(when: str, fps: float, num_frames: int, what: str) -> int:
    """``TIME`` of ``PATH@TIME`` (seconds ``1.5`` / ``1.5s``, or ``#frame``) as a frame; a one-line error otherwise."""
    text = when[1:] if when.startswith("#") else (when[:-1] if when.endswith("s") else when)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and not math.isfinite(value):
        raise GenerateError(f"{what} time {when!r} is not a finite number: give seconds (1.5, 1.5s) or a frame (#12).")
    if value is not None and value < 0:
        raise GenerateError(f"{what} time {when!r} is negative: times count from the first frame, 0.")
    try:
        return frame_at_time(when, fps, num_frames)
    except ValueError as e:
        raise GenerateError(f"{what}: {e}") from None


def _whole(value: Any, what: str) -> int:
    """``value`` as an int, or a GenerateError: a whole number (not a bool, not 1.5, not NaN)."""
    ok = isinstance(value, int | np.integer) or (isinstance(value, float | np.floating) and float(value).is_integer())
    if isinstance(value, bool) or not ok:
        raise GenerateError(f"{what}={value!r}: give a whole number.")
    return int(value)


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float, or a GenerateError."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise GenerateError(f"{what}={value!r}: give a number.") from None
    if isinstance(value, bool) or not math.isfinite(x):
        raise GenerateError(f"{what}={value!r}: give a finite number.")
    return x


def _num_frames(req: Request, fps: float) -> int:
    if req.frames is not None and req.duration is not None:
        raise GenerateError("give --duration (seconds) or --frames, not both.")
    if req.frames is not None:
        frames = _whole(req.frames, "--frames")
        if frames < 1:
            raise GenerateError(f"--frames={req.frames}: a video needs at least one frame.")
        return frames
    if req.duration is not None:
        duration = finite_number(req.duration, "--duration")
        if not duration > 0:
            raise GenerateError(f"--duration={req.duration}: give a positive number of seconds.")
        frames = duration * fps
        if not math.isfinite(frames):
            raise GenerateError(f"--duration={req.duration} at {fps:g} fps is not a finite number of frames.")
        return max(1, int(round(frames)))
    return _whole(req.config.video.num_frames, "the config's video.num_frames")


def _fps(req: Request) -> float:
    what = "--fps" if req.fps is not None else "the config's video.fps"
    fps = finite_number(req.config.video.fps if req.fps is None else req.fps, what)
    if not MIN_FPS <= fps <= MAX_FPS:
        raise GenerateError(f"{what}={fps:g}: give a frame rate from {MIN_FPS:g} to {MAX_FPS:g} frames per second.")
    return fps


def _size(req: Request) -> tuple[int, int]:
    cfg = req.config
    height = _whole(cfg.video.height if req.height is None else req.height, "--height")
    width = _whole(cfg.video.width if req.width is None else req.width, "--width")
    _, ph, pw = cfg.model.patch_size
    f = vae_config_from(cfg.vae).spatial_factor
    if height < 1 or width < 1 or height % (f * ph) or width % (f * pw):
        raise GenerateError(f"the video size {width}x{height} must be a positive multiple of {f * pw}x{f * ph} "
                            f"(the VAE's {f}x times the DiT patch).")
    return height, width


def _budget(req: Request) -> int:
    limit = DEFAULT_MAX_PIXELS if req.max_pixels is None else _whole(req.max_pixels, "--max_pixels")
    if limit < 1:
        raise GenerateError(f"--max_pixels={limit}: the memory budget is a positive number of pixels.")
    return limit


def _check_budget(req: Request, num_frames: int, height: int, width: int, scale: int) -> None:
    """frames x height x width (and the SR output's) within the memory budget, before anything is allocated."""
    limit = _budget(req)
    sizes = [("the video", num_frames, height, width)]
    if scale > 1:
        sizes.append(("the SR output", num_frames, height * scale, width * scale))
    for what, t, h, w in sizes:
        pixels = t * h * w
        if pixels > limit:
            raise GenerateError(f"{what} is {t} frames x {h} x {w} = {pixels:,} pixels, over the memory budget of "
                                f"{limit:,} pixels (frames x height x width): ask for fewer frames or a smaller "
                                f"size, or raise the budget with --max_pixels={pixels} if the machine has the "
                                "memory.")


def _probe_dir(directory: Path) -> str | None:
    """Why no file can be created in the existing ``directory`` (None: it can), by creating and removing one."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".generate-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_output(out: str) -> None:
    """``out`` names a local .mp4 whose directory exists (or can be created) and is writable, and none of the set's
    files (OUT.mp4, OUT.png, OUT.json) is a directory. Nothing is created: the nearest existing directory is probed
    with a temporary file, removed at once."""
    text = str(out)
    if not text.endswith(".mp4"):
        raise GenerateError(f"--out {out!r} must name an .mp4 file (the contact sheet and settings go beside it).")
    if is_remote(text):
        raise GenerateError(f"--out {out!r} is cloud storage: write to a local path and copy the three files "
                            "(OUT.mp4, OUT.png, OUT.json) up afterwards.")
    mp4 = Path(text)
    if not mp4.stem or mp4.name.startswith("."):
        raise GenerateError(f"--out {out!r} needs a file name before .mp4 (e.g. out/video.mp4).")
    for path in (mp4, mp4.with_suffix(".png"), mp4.with_suffix(".json"), Path(text + ".lock")):
        if path.is_dir():
            raise GenerateError(f"--out {out!r}: {path} is a directory; name a file (e.g. {path / 'video.mp4'}).")
    existing = mp4.parent.resolve() if mp4.parent != Path("") else Path.cwd()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GenerateError(f"--out {out!r}: {existing} is a file, so the directory {mp4.parent} cannot be created.")
    problem = _probe_dir(existing)
    if problem:
        where = "" if existing == mp4.parent.resolve() else f" (to hold the new {mp4.parent})"
        raise GenerateError(f"--out {out!r}: the directory {existing}{where} is not writable ({problem}); choose "
                            "another --out.")


def _check_scalars(req: Request) -> None:
    seed = _whole(req.seed, "--seed")
    if not 0 <= seed <= MAX_SEED:
        raise GenerateError(f"--seed={seed}: give a seed from 0 to 2**63 - 1.")
    if req.weights not in WEIGHTS:
        raise GenerateError(f"--weights={req.weights!r}: choose one of {', '.join(WEIGHTS)}.")
    if req.step is not None and _whole(req.step, "--step") < 0:
        raise GenerateError(f"--step={req.step}: checkpoint steps count from 0.")
    if req.sr_steps is not None:
        n = _whole(req.sr_steps, "--sr_steps")
        if not 1 <= n <= 10_000:
            raise GenerateError(f"--sr_steps={n}: sample with 1 to 10000 steps.")


def _sr_scale(req: Request, height: int, width: int) -> int:
    if not req.sr_ckpt or req.sr_config is None:
        raise GenerateError("--sr needs --sr_ckpt (a Director-SR trainer workdir; its config comes with it).")
    task = req.sr_config.get("task", "sr")
    if task != "sr":
        raise GenerateError(f"--sr_config is a {task!r} config, not a Director-SR one (task = 'sr'): give the config "
                            "the SR checkpoint was trained with.")
    try:
        v = req.sr_config.video
        sh, sw = _whole(v.height, "the SR config's video.height"), _whole(v.width, "the SR config's video.width")
    except (AttributeError, KeyError) as e:
        raise GenerateError(f"--sr_config has no video.height / video.width ({e}): give the Director-SR "
                            "config.") from None
    if sh < 1 or sw < 1:
        raise GenerateError(f"the SR config's video is {sw}x{sh}: give the Director-SR config.")
    if sh % height or sw % width or sh // height != sw // width:
        raise GenerateError(f"the SR config's video is {sw}x{sh}, not a whole multiple of the generated "
                            f"{width}x{height}.")
    return sh // height


def check_checkpoint(path: str | None, step: int | None, what: str = "--ckpt") -> None:
    """A clear error unless ``path`` holds a complete trainer checkpoint step (``step``, or any), or is a weight
    source (a diffusers directory, a Wan release, a weight file: read with the given config)."""
    if not path:
        raise GenerateError(f"{what} is required: the trainer's workdir (or its checkpoints/ directory).")
    if not is_trainer_run(path) and looks_like_weights(path):
        if step is not None:
            raise GenerateError(f"--step chooses among a training run's checkpoints; {what} {path} is a weight "
                                "source (a diffusers directory, a Wan release or a weight file).")
        return
    try:
        step_directory(path, step)
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"{what}: {e}") from None


def looks_like_weights(path: str) -> bool:
    """A weight file, or a directory holding a model's config.json or weights (diffusers, a Wan release)."""
    p = storage_path(path)
    if p.is_file():
        return p.name.endswith((".safetensors", ".safetensors.index.json", ".pth", ".pt", ".bin"))
    return p.is_dir() and ((p / "config.json").exists() or (p / "transformer").is_dir()
                           or any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")))


def run_config(path: str | None, step: int | None, what: str = "--ckpt") -> ml_collections.ConfigDict:
    """The config the run at ``path`` was trained with: the trainer records it in every checkpoint step.

    So a user passes only ``--ckpt``: the model, its VAE and its sampling defaults come with it.
    """
    check_checkpoint(path, step, what)
    if not is_trainer_run(path) and looks_like_weights(path):
        flag = "--config" if what == "--ckpt" else "--sr_config"
        raise GenerateError(f"{what} {path} is a weight source (diffusers / official Wan layout), not a training run, "
                            f"so it records no config: pass {flag} with the model's config (e.g. "
                            "configs/gen_1_3b.py, its vae.init_from the Wan VAE).")
    step_dir, _ = step_directory(path, step)
    saved = saved_config(step_dir)
    if saved is None:
        raise GenerateError(f"{what} {path}: step {step_dir.name} records no config (an older run); pass the config "
                            "it was trained with (--config for generate, --config.model_config for evaluate).")
    return ml_collections.ConfigDict(saved)


def _sampling(req: Request) -> SamplingSettings:
    try:
        return sampling_settings(req.config, sampler=req.sampler, steps=req.steps, shift=req.shift,
                                 guidance_scale=req.guidance, keyframe_guidance=req.keyframe_guidance)
    except UserError as e:  # named by the settings' fields: say the flags
        raise GenerateError("--" + str(e).replace("guidance_scale=", "guidance=")) from None


def _read_keyframes(req: Request, fps: float, num_frames: int, height: int, width: int, scale: int):
    keyframes, given, full_res = [], {}, {}
    last = None
    for arg in req.keyframes:
        path, when = split_at(arg, "--keyframe")
        frame = frame_of(when, fps, num_frames, "--keyframe")
        if last is not None and frame <= last[1]:
            kind = "the same frame as" if frame == last[1] else "before"
            raise GenerateError(f"--keyframe {arg} lands on frame {frame}, {kind} the previous keyframe {last[0]} "
                                f"(frame {last[1]}): give keyframes once each, in increasing time order.")
        last = (arg, frame)
        if req.sr:
            big = read_image(path, height * scale, width * scale, resize=req.resize)
            full_res[frame] = to_float(big)
            small = resized(big, height, width)
        else:
            small = read_image(path, height, width, resize=req.resize)
        given[frame] = to_float(small)
        keyframes.append(dict(path=str(Path(path).resolve()), time=when, frame=frame, seconds=frame / fps,
                              sha256=sha256(path)))
    return keyframes, given, full_res


def _frame_pixel_limit(req: Request, num_frames: int) -> int:
    """The largest frame a given video may have: its (at most num_frames + 1) decoded frames within the budget."""
    return max(_budget(req) // max(num_frames, 1), 1)


def _read_videos(req: Request, fps: float, num_frames: int, height: int, width: int, given: dict) -> list[dict]:
    videos = []
    for arg in req.videos:
        path, when = split_at(arg, "--video")
        clip = read_video(path, height, width, resize=req.resize, max_frames=num_frames,
                          max_frame_pixels=_frame_pixel_limit(req, num_frames))
        if when == "end":
            start = num_frames - len(clip)
            if start < 0:
                raise GenerateError(f"--video {arg} has {len(clip)} frames, more than the {num_frames} of the video.")
        else:
            start = frame_of(when, fps, num_frames, "--video")
        if start + len(clip) > num_frames:
            raise GenerateError(f"--video {arg}: its {len(clip)} frames from frame {start} run past the end of the "
                                f"video ({num_frames} frames = {num_frames / fps:g} s): lengthen the video "
                                "(--duration/--frames) or start it earlier.")
        if start in given:
            raise GenerateError(f"--video {arg} starts on frame {start}, which a keyframe already gives.")
        given[start] = to_float(clip)
        videos.append(dict(path=str(Path(path).resolve()), start=when, frame=start, length=len(clip),
                           sha256=sha256(path)))
    return videos


def plan(req: Request) -> Plan:
    """Checks every input and reads the given frames; raises GenerateError before anything is loaded or written."""
    check_output(req.out)
    fps = _fps(req)
    height, width = _size(req)
    num_frames = _num_frames(req, fps)
    _check_scalars(req)
    sampling = _sampling(req)
    scale = _sr_scale(req, height, width) if req.sr else 1
    _check_budget(req, num_frames, height, width, scale)
    if not req.keyframes and not req.videos:
        raise GenerateError("no given frames: pass at least one --keyframe PATH@TIME (or a --video PATH@START).")
    if req.caption is not None and req.shot_captions:
        raise GenerateError("give --caption or --shot_caption (repeated, one per shot), not both.")

    keyframes, given, full_res = _read_keyframes(req, fps, num_frames, height, width, scale)
    videos = _read_videos(req, fps, num_frames, height, width, given)
    try:
        timeline = Timeline.from_keyframes(num_frames, [k["frame"] for k in keyframes],
                                           [(v["frame"], v["length"]) for v in videos])
        timeline.layout.describe()  # checks the spans
    except ValueError as e:
        raise GenerateError(f"the given frames do not fit the video: {e}") from None
    caption = req.caption
    if req.shot_captions:
        try:
            caption = format_multishot_caption(list(req.shot_captions))
        except ValueError as e:
            raise GenerateError(f"--shot_caption: {e}") from None
    return Plan(num_frames, fps, height, width, keyframes, videos, given, full_res, caption, timeline, sampling, scale)
