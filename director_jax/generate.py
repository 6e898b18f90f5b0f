"""``python -m director_jax.generate``: a video from keyframes (and conditioning videos) with a Director-Gen checkpoint.

    python -m director_jax.generate --config configs/gen_tiny.py --ckpt runs/gen_tiny \\
        --keyframe first.png@0 --keyframe mid.png@1s --keyframe last.png@#16 --frames 17 --seed 0 --out out.mp4

Every mode of DESIGN.md is a timeline of given frames: ``--keyframe PATH@TIME`` (repeated; TIME in
seconds, ``1.5`` or ``1.5s``, or a frame ``#12``, in increasing order) puts keyframes anywhere, and
the keyframe times set the pacing (the same keyframes further apart: slower). ``--video PATH@START``
gives a conditioning video segment (START as TIME, or ``end``): at the start, the video is extended
forward; at the end, backward; two videos, in between. ``--shot_caption`` (repeated) builds the
shot-structured caption of ``data/captions.py`` for multi-shot videos (``--caption``: one caption as
it is); models trained without captions (``text.conditioning=False``) ignore them, with a note.
``--keyframe_guidance S`` (default the config's ``sampler.keyframe_guidance``; 1 = off) pushes the
generated frames toward what the keyframes imply, for models trained with keyframe dropout
(``diffusion.keyframe_guided_velocity``; two model calls per step).

Writes ``OUT.mp4`` (H.264), ``OUT.png`` (a contact sheet with the keyframe frames outlined in yellow)
and ``OUT.json`` (the exact settings: seed, frames, times, checkpoint step, ...). Every input is
checked before the model is loaded; a bad one raises a clear error and nothing is written. The
files are written atomically, and if one of them fails the others are removed. The same settings
and seed give the same video, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class GenerateError(ValueError):
    """A bad input of ``python -m director_jax.generate`` (reported without a traceback)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """Everything the command needs; the CLI flags map one to one onto these fields."""

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
    config_path: str | None = None  # for the sidecar only
    sr_config_path: str | None = None
    argv: Sequence[str] | None = None  # the command line, for the sidecar only


@dataclasses.dataclass
class Plan:
    """Checked inputs: the timeline and the given frames, before any model is loaded."""

    num_frames: int
    fps: float
    height: int
    width: int
    keyframes: list[dict]  # path, time, frame, seconds, sha256
    videos: list[dict]  # path, start, frame, length
    given: dict[int, np.ndarray]  # start frame -> (H, W, 3) or (n, H, W, 3) in [-1, 1] at the gen resolution
    full_res_keyframes: dict[int, np.ndarray]  # for --sr: keyframes at the SR output resolution
    caption: str | None


# ------------------------------------------------------------------------------------------------
# Input parsing and checks (no model, no output)


def split_at(arg: str, what: str) -> tuple[str, str]:
    """``PATH@TIME`` -> (PATH, TIME); the last ``@`` splits, so paths may contain ``@``."""
    path, sep, when = str(arg).rpartition("@")
    if not sep or not path or not when.strip():
        example = "first.png@0, mid.png@1.5s or last.png@#16" if what == "--keyframe" else "clip.mp4@0 or clip.mp4@end"
        raise GenerateError(f"{what} {arg!r} is not PATH@TIME: write e.g. {example}.")
    return path, when.strip()


def _frame(when: str, fps: float, num_frames: int, what: str) -> int:
    from director_jax.models.timeline import frame_at_time

    text = when[1:] if when.startswith("#") else (when[:-1] if when.endswith("s") else when)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None and value < 0:
        raise GenerateError(f"{what} time {when!r} is negative: times count from the first frame, 0.")
    try:
        return frame_at_time(when, fps, num_frames)
    except ValueError as e:
        raise GenerateError(f"{what}: {e}") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _to_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 127.5 - 1.0


def _resized(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BICUBIC))


def read_image(path: str, height: int, width: int, *, resize: bool, what: str = "--keyframe") -> np.ndarray:
    """An RGB image as uint8 (H, W, 3) at exactly height x width (resized only with ``resize``)."""
    from PIL import Image, UnidentifiedImageError

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
                                "pass images of that size, or --resize to resize them (bicubic), or set "
                                "--width/--height.")
        pixels = _resized(pixels, height, width)
    return pixels


def read_video(path: str, height: int, width: int, *, resize: bool) -> np.ndarray:
    """A video file's frames as uint8 (n, H, W, 3)."""
    import av

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
        frames = [_resized(f, height, width) for f in frames]
    return np.stack(frames)


def _num_frames(req: Request, fps: float) -> int:
    if req.frames is not None and req.duration is not None:
        raise GenerateError("give --duration (seconds) or --frames, not both.")
    if req.frames is not None:
        if req.frames < 1:
            raise GenerateError(f"--frames={req.frames}: a video needs at least one frame.")
        return int(req.frames)
    if req.duration is not None:
        if not req.duration > 0:
            raise GenerateError(f"--duration={req.duration}: give a positive number of seconds.")
        return max(1, int(round(req.duration * fps)))
    return int(req.config.video.num_frames)


def _sr_scale(req: Request, height: int, width: int) -> int:
    v = req.sr_config.video
    sh, sw = int(v.height), int(v.width)
    if sh % height or sw % width or sh // height != sw // width:
        raise GenerateError(f"the SR config's video is {sw}x{sh}, not a whole multiple of the generated "
                            f"{width}x{height}.")
    return sh // height


def plan(req: Request) -> Plan:
    """Checks every input and reads the given frames; raises GenerateError before anything is loaded or written."""
    from director_jax.models.timeline import Timeline

    cfg = req.config
    if not str(req.out).endswith(".mp4"):
        raise GenerateError(f"--out {req.out!r} must name an .mp4 file (the contact sheet and settings go beside it).")
    fps = float(cfg.video.fps if req.fps is None else req.fps)
    if not fps > 0:
        raise GenerateError(f"--fps={fps}: give a positive frame rate.")
    height = int(cfg.video.height if req.height is None else req.height)
    width = int(cfg.video.width if req.width is None else req.width)
    _, ph, pw = cfg.model.patch_size
    from director_jax.train.tasks import vae_config_from

    f = vae_config_from(cfg.vae).spatial_factor
    if height < 1 or width < 1 or height % (f * ph) or width % (f * pw):
        raise GenerateError(f"the video size {width}x{height} must be a positive multiple of {f * pw}x{f * ph} "
                            f"(the VAE's {f}x times the DiT patch).")
    num_frames = _num_frames(req, fps)
    if not req.keyframes and not req.videos:
        raise GenerateError("no given frames: pass at least one --keyframe PATH@TIME (or a --video PATH@START).")
    if req.caption is not None and req.shot_captions:
        raise GenerateError("give --caption or --shot_caption (repeated, one per shot), not both.")
    if req.sr:
        _check_sr_request(req)
    scale = _sr_scale(req, height, width) if req.sr else 1

    keyframes, given, full_res = [], {}, {}
    last = None
    for arg in req.keyframes:
        path, when = split_at(arg, "--keyframe")
        frame = _frame(when, fps, num_frames, "--keyframe")
        if last is not None and frame <= last[1]:
            kind = "the same frame as" if frame == last[1] else "before"
            raise GenerateError(f"--keyframe {arg} lands on frame {frame}, {kind} the previous keyframe {last[0]} "
                                f"(frame {last[1]}): give keyframes once each, in increasing time order.")
        last = (arg, frame)
        if req.sr:
            big = read_image(path, height * scale, width * scale, resize=req.resize)
            full_res[frame] = _to_float(big)
            small = np.asarray(_resized(big, height, width))
        else:
            small = read_image(path, height, width, resize=req.resize)
        given[frame] = _to_float(small)
        keyframes.append(dict(path=str(Path(path).resolve()), time=when, frame=frame, seconds=frame / fps,
                              sha256=_sha256(Path(path))))
    videos = []
    for arg in req.videos:
        path, when = split_at(arg, "--video")
        clip = read_video(path, height, width, resize=req.resize)
        if when == "end":
            start = num_frames - len(clip)
            if start < 0:
                raise GenerateError(f"--video {arg} has {len(clip)} frames, more than the {num_frames} of the video.")
        else:
            start = _frame(when, fps, num_frames, "--video")
        if start + len(clip) > num_frames:
            raise GenerateError(f"--video {arg}: its {len(clip)} frames from frame {start} run past the end of the "
                                f"video ({num_frames} frames = {num_frames / fps:g} s): lengthen the video "
                                "(--duration/--frames) or start it earlier.")
        if start in given:
            raise GenerateError(f"--video {arg} starts on frame {start}, which a keyframe already gives.")
        given[start] = _to_float(clip)
        videos.append(dict(path=str(Path(path).resolve()), start=when, frame=start, length=len(clip),
                           sha256=_sha256(Path(path))))
    try:
        Timeline.from_keyframes(num_frames, [k["frame"] for k in keyframes],
                                [(v["frame"], v["length"]) for v in videos]).layout.describe()  # checks the spans
    except ValueError as e:
        raise GenerateError(f"the given frames do not fit the video: {e}") from None
    caption = req.caption
    if req.shot_captions:
        from director_jax.data.captions import format_multishot_caption

        try:
            caption = format_multishot_caption(list(req.shot_captions))
        except ValueError as e:
            raise GenerateError(f"--shot_caption: {e}") from None
    return Plan(num_frames, fps, height, width, keyframes, videos, given, full_res, caption)


def _check_sr_request(req: Request) -> None:
    try:
        from director_jax.pipeline.sr import super_resolve  # noqa: F401
    except ImportError as e:
        raise GenerateError(f"--sr needs director_jax.pipeline.sr.super_resolve, which is not available "
                            f"({e}).") from None
    if not req.sr_ckpt or req.sr_config is None:
        raise GenerateError("--sr needs --sr_ckpt (a Director-SR trainer workdir) and --sr_config (its config file).")


def check_checkpoint(path: str, step: int | None, what: str = "--ckpt") -> None:
    from director_jax.eval.checkpoint import step_directory

    if not path:
        raise GenerateError(f"{what} is required: the trainer's workdir (or its checkpoints/ directory).")
    try:
        step_directory(path, step)
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"{what}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Generation


def _vae_codec(vae):
    from flax import nnx

    graphdef, state = nnx.split(vae)
    return (lambda x: _encode(graphdef, state, x)), (lambda z: _decode(graphdef, state, z))


@functools.cache
def _jits():
    import jax
    from flax import nnx

    enc = jax.jit(lambda g, s, x: nnx.merge(g, s).encode(x), static_argnums=0)
    dec = jax.jit(lambda g, s, z: nnx.merge(g, s).decode(z), static_argnums=0)
    return enc, dec


def _encode(graphdef, state, x):
    return _jits()[0](graphdef, state, x)


def _decode(graphdef, state, z):
    return _jits()[1](graphdef, state, z)


def text_inputs(req: Request, caption: str | None, guidance: float):
    """(text, mask, negative, negative_mask) as (1, Lt, D) arrays; an unconditional model gets the empty caption."""
    cfg = req.config
    dim = int(cfg.model.text_dim)
    if not cfg.text.conditioning:
        if caption:
            log.warning("the model was trained without captions (text.conditioning=False): the caption is ignored.")
        empty, empty_mask = np.zeros((1, 1, dim), np.float32), np.zeros((1, 1), bool)
        return empty, empty_mask, *((empty, empty_mask) if guidance != 1.0 else (None, None))
    if not caption:
        raise GenerateError("the model is text-conditioned: give --caption or --shot_caption (one per shot).")
    if not req.text_cache:
        raise GenerateError("the model is text-conditioned: give --text_cache, a text-embedding cache holding the "
                            "caption (python -m director_jax.data.text_embeddings --captions ...).")
    from director_jax.data.text_embeddings import load_text_embeddings

    length = int(cfg.text.max_length)
    try:
        text, mask = load_text_embeddings(req.text_cache, [caption], max_length=length)
        negative = negative_mask = None
        if guidance != 1.0:
            negative, negative_mask = load_text_embeddings(req.text_cache, [str(cfg.sampler.negative_prompt)],
                                                           max_length=length)
    except FileNotFoundError as e:
        raise GenerateError(str(e)) from None
    return text, mask, negative, negative_mask


def _load_sr(req: Request, sharding):
    """Director-SR weights (EMA when kept) from an SR trainer checkpoint."""
    from director_jax.eval.checkpoint import load_director_sr

    try:
        sr, loaded = load_director_sr(req.sr_config, req.sr_ckpt, sharding=sharding)
    except ValueError as e:
        raise GenerateError(f"--sr_ckpt: {e}") from None
    return sr, dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights)


def generate(req: Request) -> dict:
    """Checks the inputs, generates the video and writes OUT.mp4, OUT.png and OUT.json.

    Returns the settings written to OUT.json, plus ``"frames"``: the generated (T, H, W, 3) float video in [-1, 1]
    (at the SR resolution with ``sr``) and ``"lowres"`` (the Gen output) for callers and tests.
    """
    import jax

    from director_jax.eval.checkpoint import load_director_gen, load_frozen_vae
    from director_jax.models.timeline import Timeline, place_given_frames
    from director_jax.pipeline.gen import generate_video

    cfg = req.config
    p = plan(req)
    check_checkpoint(req.ckpt, req.step)
    if req.sr:
        check_checkpoint(req.sr_ckpt, None, "--sr_ckpt")
    steps = int(cfg.sampler.steps if req.steps is None else req.steps)
    if steps < 1:
        raise GenerateError(f"--steps={steps}: sample with at least one step.")
    guidance = float(cfg.sampler.guidance_scale if req.guidance is None else req.guidance)
    keyframe_guidance = float(cfg.sampler.get("keyframe_guidance", 1.0) if req.keyframe_guidance is None
                              else req.keyframe_guidance)
    if not np.isfinite(keyframe_guidance):
        raise GenerateError(f"--keyframe_guidance={keyframe_guidance}: give a finite scale (1 = off).")
    shift = float(cfg.sampler.shift if req.shift is None else req.shift)
    sampler = str(cfg.sampler.name if req.sampler is None else req.sampler)
    text, mask, negative, negative_mask = text_inputs(req, p.caption, guidance)

    timeline = Timeline.from_keyframes(p.num_frames, [k["frame"] for k in p.keyframes],
                                       [(v["frame"], v["length"]) for v in p.videos])
    layout = timeline.layout
    log.info("timeline:\n%s", layout.describe())
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    gen, loaded = load_director_gen(cfg, req.ckpt, sharding=sharding, step=req.step, weights=req.weights)
    vae = load_frozen_vae(cfg, sharding=sharding)
    encode, decode = _vae_codec(vae)
    given = place_given_frames(p.num_frames, p.given)[None]
    kw = {} if negative is None else {"negative_text": negative, "negative_mask": negative_mask}
    video, _ = generate_video(gen, vae, layout, given, text, key=jax.random.key(req.seed), encode=encode,
                              decode=decode, text_mask=mask, steps=steps, sampler=sampler, shift=shift,
                              guidance_scale=guidance, keyframe_guidance=keyframe_guidance, progress=req.progress,
                              **kw)
    lowres = np.clip(np.asarray(video[0], np.float32), -1.0, 1.0)
    frames = lowres
    sr_info = None
    if req.sr:
        frames, sr_info = _super_resolve(req, p, lowres, layout, sharding)

    settings = dict(
        command="python -m director_jax.generate", argv=None if req.argv is None else list(req.argv),
        config=req.config_path,
        checkpoint=dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights),
        seed=req.seed, steps=steps, sampler=sampler, shift=shift, guidance=guidance,
        keyframe_guidance=keyframe_guidance,
        fps=p.fps, num_frames=p.num_frames, duration=p.num_frames / p.fps, height=int(frames.shape[1]),
        width=int(frames.shape[2]), gen_height=p.height, gen_width=p.width, resize=req.resize,
        keyframes=p.keyframes, videos=p.videos, caption=p.caption,
        caption_used=bool(cfg.text.conditioning and p.caption),
        chunks=[dict(start=c.start, length=c.length, given_frames=c.given_frames) for c in layout.chunks],
        sr=sr_info,
    )
    write_outputs(req.out, frames, p, settings, given[0])
    return dict(settings, frames=frames, lowres=lowres)


def _super_resolve(req: Request, p: Plan, lowres: np.ndarray, layout, sharding) -> tuple[np.ndarray, dict]:
    import jax

    from director_jax.eval.checkpoint import load_frozen_vae
    from director_jax.pipeline.sr import super_resolve

    scale = _sr_scale(req, p.height, p.width)
    sr, loaded = _load_sr(req, sharding)
    sr_vae = load_frozen_vae(req.sr_config, sharding=sharding)
    s = req.sr_config.sampler
    steps = int(s.steps if req.sr_steps is None else req.sr_steps)
    key = jax.random.fold_in(jax.random.key(req.seed), 1)
    video = super_resolve(sr, sr_vae, lowres, p.full_res_keyframes or None, scale=scale, key=key, layout=layout,
                          steps=steps, sampler=str(s.name), shift=float(s.shift))
    return np.asarray(video, np.float32), dict(checkpoint=loaded, config=req.sr_config_path, scale=scale, steps=steps,
                                               sampler=str(s.name), shift=float(s.shift))


def write_outputs(out: str, frames: np.ndarray, p: Plan, settings: dict, given: np.ndarray | None = None) -> None:
    """OUT.mp4, OUT.png (keyframes outlined) and OUT.json, each atomically; on a failure none is left behind."""
    from director_jax.io_utils import atomic_write_text
    from director_jax.video_io import contact_sheet, write_mp4

    mp4 = Path(out)
    sheet, sidecar = mp4.with_suffix(".png"), mp4.with_suffix(".json")
    marked = [k["frame"] for k in p.keyframes]
    written: list[Path] = []
    try:
        written.append(write_mp4(mp4, frames, p.fps))
        scale = max(1, math.ceil(64 / max(frames.shape[1:3])))
        rows = [("generated", frames)]
        if given is not None and given.shape == frames.shape:
            rows.append(("given", given))
        written.append(contact_sheet(sheet, rows, marked=marked, scale=scale))
        written.append(atomic_write_text(sidecar, json.dumps(settings, indent=2, default=str) + "\n"))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# CLI

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_FLAGS: dict | None = None


def define_flags() -> dict:
    """Defines the command's flags (once) and returns them by name.

    Defined on demand, not at import, so programs that use ``generate()`` as a library (the CPU
    demo, with its own ``--config``) can import this module without a flag clash.
    """
    global _FLAGS
    if _FLAGS is None:
        d = flags
        _FLAGS = dict(
            config=config_flags.DEFINE_config_file("config", None, "The model config of the checkpoint."),
            ckpt=d.DEFINE_string("ckpt", None, "Director-Gen checkpoint: a trainer workdir, checkpoints/ or step dir."),
            step=d.DEFINE_integer("step", None, "Checkpoint step (default: the newest)."),
            weights=d.DEFINE_enum("weights", "auto", ["auto", "ema", "params"], "Which weights (auto: EMA when kept)."),
            keyframe=d.DEFINE_multi_string("keyframe", [], "PATH@TIME, TIME in seconds (1.5, 1.5s) or #frame."),
            video=d.DEFINE_multi_string("video", [], "PATH@START, repeated: conditioning video (START: time or end)."),
            duration=d.DEFINE_float("duration", None, "Video length in seconds (or --frames; default the config's)."),
            frames=d.DEFINE_integer("frames", None, "Video length in frames."),
            fps=d.DEFINE_float("fps", None, "Frames per second (default the config's video.fps)."),
            height=d.DEFINE_integer("height", None, "Height in pixels (default the config's)."),
            width=d.DEFINE_integer("width", None, "Width in pixels (default the config's)."),
            resize=d.DEFINE_bool("resize", False, "Resize keyframes / videos of another size (bicubic), not refuse."),
            caption=d.DEFINE_string("caption", None, "The caption, as it is."),
            shot_caption=d.DEFINE_multi_string("shot_caption", [], "One caption per shot, repeated (multi-shot)."),
            text_cache=d.DEFINE_string("text_cache", None, "Text-embedding cache holding the caption (conditioned)."),
            seed=d.DEFINE_integer("seed", 0, "Noise seed: the same seed gives the same video."),
            steps=d.DEFINE_integer("steps", None, "Sampler steps (default the config's sampler.steps)."),
            guidance=d.DEFINE_float("guidance", None, "Classifier-free guidance scale (default the config's)."),
            keyframe_guidance=d.DEFINE_float("keyframe_guidance", None,
                                             "Keyframe guidance scale, 1 = off (default the config's "
                                             "sampler.keyframe_guidance); needs a model trained with keyframe "
                                             "dropout."),
            shift=d.DEFINE_float("shift", None, "Sampler timestep shift (default the config's)."),
            sampler=d.DEFINE_string("sampler", None, "Sampler name (default the config's sampler.name)."),
            sr=d.DEFINE_bool("sr", False, "Super-resolve the result with Director-SR (needs --sr_ckpt, --sr_config)."),
            sr_ckpt=d.DEFINE_string("sr_ckpt", None, "Director-SR checkpoint (trainer workdir)."),
            sr_config=config_flags.DEFINE_config_file("sr_config", None, "The Director-SR model config."),
            sr_steps=d.DEFINE_integer("sr_steps", None, "SR sampler steps (default the SR config's)."),
            out=d.DEFINE_string("out", None, "Output .mp4 (OUT.png and OUT.json are written beside it)."),
            progress=d.DEFINE_bool("progress", True, "Show a progress bar over the sampling steps."),
        )
    return _FLAGS


def request_from_flags() -> Request:
    v = {name: flag.value for name, flag in define_flags().items()}
    if v["config"] is None:
        raise GenerateError("--config is required: the model config the checkpoint was trained with.")
    if not v["out"]:
        raise GenerateError("--out PATH.mp4 is required.")
    if not v["ckpt"]:
        raise GenerateError("--ckpt is required: the trainer's workdir (or its checkpoints/ directory).")
    return Request(
        config=v["config"], ckpt=v["ckpt"], out=v["out"], keyframes=tuple(v["keyframe"]), videos=tuple(v["video"]),
        duration=v["duration"], frames=v["frames"], fps=v["fps"], height=v["height"], width=v["width"],
        caption=v["caption"], shot_captions=tuple(v["shot_caption"]), text_cache=v["text_cache"], seed=v["seed"],
        steps=v["steps"], guidance=v["guidance"], keyframe_guidance=v["keyframe_guidance"], shift=v["shift"],
        sampler=v["sampler"], resize=v["resize"],
        step=v["step"], weights=v["weights"], sr=v["sr"], sr_ckpt=v["sr_ckpt"], sr_config=v["sr_config"],
        sr_steps=v["sr_steps"], progress=v["progress"], config_path=flags.FLAGS["config"].config_filename,
        sr_config_path=flags.FLAGS["sr_config"].config_filename if v["sr_config"] is not None else None)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag.")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = generate(dataclasses.replace(request_from_flags(), argv=tuple(sys.argv[1:])))
    except GenerateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(define_flags()["out"].value)
    print(f"{result['num_frames']} frames at {result['fps']:g} fps ({result['width']}x{result['height']}), "
          f"checkpoint step {result['checkpoint']['step']} -> {out}, {out.with_suffix('.png')}, "
          f"{out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    define_flags()
    sys.exit(app.run(main))
