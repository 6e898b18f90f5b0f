"""``python -m director_jax.pytorch`` without the flags: its inputs, checked and read, and its settings.

``check_inputs(Flags(...))`` reads and checks everything the command needs except the models (a bad
input raises ``errors.UserError``: one line, before any work), and the settings OUT.json records (every
setting, the inputs' paths and SHA-256); ``outputs.py`` writes the files.

Settings come from the flags, else from ``--config`` (the Director-Gen training config: its
``sampler`` section, ``video.num_frames`` / ``fps`` / ``height`` / ``width``, ``text``), else from
``BUILTIN`` (without ``--config``: the frame count is then required and the size is the first
keyframe's). OUT.json says where each came from (``sources``).

Text: ``--caption`` read from a umT5 cache (``--text_cache``, written by ``python -m
director_jax.embed_text``), or ``--text_embeddings`` (a ``.npy``), or neither: the zero embedding of
a model trained without captions (``pipeline.settings.text_inputs``' empty caption), which a config
with ``text.conditioning=False`` always uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from director_jax.configs_common import load_config
from director_jax.data.text_embeddings import DEFAULT_MAX_LENGTH, load_text_embeddings
from director_jax.errors import UserError
from director_jax.models.timeline import Timeline, TimelineLayout, place_given_frames
from director_jax.pipeline.media import read_image, sha256, to_float
from director_jax.pipeline.request import MAX_FPS, MAX_SEED, MIN_FPS, finite_number, frame_of, run_config, split_at
from director_jax.pipeline.settings import EMBED_COMMAND, SamplingSettings, sampling_settings, text_inputs
from director_jax.pytorch.outputs import check_output
from director_jax.pytorch.pipeline import jax_noise, noise_shape

log = logging.getLogger(__name__)

COMMAND = "python -m director_jax.pytorch"
# Without --config: the defaults of the sampler and the video (frames: required; size: the first keyframe's).
BUILTIN = dict(sampler="unipc", steps=50, shift=5.0, guidance_scale=1.0, keyframe_guidance=1.0, fps=16.0,
               negative_caption="")
# The transformer's architecture fields a --config must agree with (config.model vs its config.json).
ARCHITECTURE = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers")


@dataclasses.dataclass(frozen=True)
class Flags:
    """The command's flags as given (``None``: not given)."""

    vae: str | None = None
    transformer: str | None = None
    keyframes: Sequence[str] = ()
    out: str | None = None
    config: str | None = None
    frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    caption: str | None = None
    text_cache: str | None = None
    negative_caption: str | None = None
    text_embeddings: str | None = None
    negative_embeddings: str | None = None
    steps: int | None = None
    sampler: str | None = None
    shift: float | None = None
    guidance_scale: float | None = None
    keyframe_guidance: float | None = None
    resize: bool = False
    seed: int = 0
    noise: str | None = None
    device: str = "cpu"
    argv: Sequence[str] | None = None


@dataclasses.dataclass
class Inputs:
    """Everything but the models, checked and read."""

    layout: TimelineLayout
    video: np.ndarray  # (1, T, H, W, 3) in [-1, 1], the keyframes on their frames
    keyframes: list[dict]  # path, time, frame, seconds, sha256
    text: np.ndarray  # (1, Lt, D)
    text_mask: np.ndarray  # (1, Lt) bool
    negative: np.ndarray | None
    negative_mask: np.ndarray | None
    noise: np.ndarray  # (1, L, h, w, z)
    sampling: SamplingSettings
    num_frames: int
    fps: float
    height: int
    width: int
    settings: dict  # OUT.json, but for the files


# -- small checks ----------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _file_record(path: str) -> dict:
    return dict(path=str(Path(path).resolve()), sha256=sha256(path))


def _read_json(directory: str, flag: str) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{flag} {directory}: no config.json there (give a directory written by "
                        "`python -m director_jax.convert export`).")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {directory}: config.json could not be read ({_one_line(e)}).") from None


def _number(flag: str, value: Any, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float within [low, high], or a UserError naming ``flag``."""
    x = finite_number(value, flag)
    if (low is not None and x < low) or (high is not None and x > high):
        raise UserError(f"{flag}={x:g}: give a number from {low:g} to {high:g}.")
    return x


def _whole(flag: str, value: Any, *, low: int = 1) -> int:
    ok = isinstance(value, int | np.integer) or (isinstance(value, float | np.floating) and float(value).is_integer())
    if isinstance(value, bool) or not ok:
        raise UserError(f"{flag}={value!r}: give a whole number.")
    if int(value) < low:
        raise UserError(f"{flag}={int(value)}: give at least {low}.")
    return int(value)


# -- the config and the defaults -------------------------------------------------------------------


def read_config(path: str) -> tuple[ml_collections.ConfigDict, dict]:
    """A Director-Gen training config and what OUT.json records of it: a config file (configs/gen_*.py), a run's
    ``config.json``, or a trainer workdir (its config.json, else the config its newest checkpoint step records)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_dir():
        cfg = run_config(path, None, "--config")
        record = dict(path=str(p.resolve()), sha256=None, source="the newest checkpoint step's recorded config")
    elif not p.is_file():
        raise UserError(f"--config {path} does not exist (give a config file such as configs/gen_tiny.py, a training "
                        "run's config.json or its workdir).")
    else:
        try:
            cfg = ml_collections.ConfigDict(json.loads(p.read_text())) if p.suffix == ".json" else load_config(p)
        except Exception as e:  # the user's file: any error in it is the input's, not ours
            raise UserError(f"--config {path} could not be read ({type(e).__name__}: {_one_line(e)}).") from None
        record = _file_record(str(p))
    if not isinstance(cfg, ml_collections.ConfigDict) or cfg.get("task", "gen") != "gen" or any(
            section not in cfg for section in ("model", "sampler", "video", "text")):
        raise UserError(f"--config {path} is not a Director-Gen config (task 'gen' with model, sampler, video and "
                        "text sections).")
    return cfg, record


def _check_config_model(cfg: ml_collections.ConfigDict, dit: dict, flags: Flags) -> None:
    for key in ARCHITECTURE:
        if key in cfg.model and key in dit:
            ours, theirs = cfg.model[key], dit[key]
            if json.dumps(list(ours) if isinstance(ours, tuple) else ours) != json.dumps(theirs):
                raise UserError(f"--config {flags.config}: its model.{key} is {ours!r} but the --transformer "
                                f"{flags.transformer} has {theirs!r}: give the config the model was trained with.")


def _defaults(cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
    """The sampler section the settings start from: the config's, or BUILTIN's."""
    if cfg is not None:
        return cfg
    return ml_collections.ConfigDict(dict(sampler=dict(
        name=BUILTIN["sampler"], steps=BUILTIN["steps"], shift=BUILTIN["shift"],
        guidance_scale=BUILTIN["guidance_scale"], keyframe_guidance=BUILTIN["keyframe_guidance"],
        negative_prompt=BUILTIN["negative_caption"])))


def _sources(flags: Flags, cfg: ml_collections.ConfigDict | None) -> dict[str, str]:
    """Where each setting came from: the flag, the config or the built-in default."""
    fallback = "config" if cfg is not None else "built-in"
    names = dict(steps="steps", sampler="sampler", shift="shift", guidance="guidance_scale",
                 keyframe_guidance="keyframe_guidance", num_frames="frames", fps="fps", height="height",
                 width="width")
    out = {key: f"--{flag}" if getattr(flags, flag) is not None else fallback for key, flag in names.items()}
    if cfg is None:
        out["num_frames"] = "--frames"
        for key in ("height", "width"):
            if out[key] == "built-in":
                out[key] = "the first keyframe"
    return out


# -- the inputs ------------------------------------------------------------------------------------


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) of the keyframe image at ``path``."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UserError(f"--keyframe image {path} does not exist.")
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--keyframe image {path} could not be read as an image ({_one_line(e)}).") from None


def _read_npy(path: str, flag: str) -> np.ndarray:
    if not Path(path).is_file():
        raise UserError(f"{flag} {path} does not exist.")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a NumPy .npy array ({_one_line(e)}).") from None
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise UserError(f"{flag} {path} must hold finite numbers.")
    return array.astype(np.float32)


def _embeddings_npy(path: str, flag: str, text_dim: int) -> np.ndarray:
    e = _read_npy(path, flag)
    e = e[None] if e.ndim == 2 else e
    if e.ndim != 3 or e.shape[0] != 1 or e.shape[-1] != text_dim:
        raise UserError(f"{flag} {path} has shape {e.shape}: give (Lt, {text_dim}) or (1, Lt, {text_dim}) (the "
                        "transformer's text_dim).")
    return e


def _text(flags: Flags, cfg: ml_collections.ConfigDict | None, text_dim: int, guidance: float, negative_caption: str):
    """(text, mask, negative, negative_mask, what OUT.json says about them)."""
    if flags.caption is not None and flags.text_embeddings:
        raise UserError("give --caption (with --text_cache) or --text_embeddings, not both.")
    if flags.text_cache and flags.caption is None:
        raise UserError("--text_cache holds caption embeddings: give the --caption to read from it.")
    if flags.negative_caption is not None and flags.caption is None:
        raise UserError("--negative_caption goes with --caption (both read from --text_cache).")
    if flags.negative_embeddings and not flags.text_embeddings:
        raise UserError("--negative_embeddings goes with --text_embeddings (with --caption the negative caption is "
                        "read from --text_cache).")
    conditioned = None if cfg is None else bool(cfg.text.conditioning)
    if conditioned is False or (conditioned is None and flags.caption is None and not flags.text_embeddings):
        if conditioned is False and (flags.caption is not None or flags.text_embeddings):
            log.warning("the model was trained without captions (the config's text.conditioning=False): "
                        "--caption / --text_embeddings are ignored.")
        elif conditioned is None:
            log.warning("no --caption: zero text embeddings, right for a model trained without captions only.")
        empty = ml_collections.ConfigDict(dict(model=dict(text_dim=text_dim), text=dict(conditioning=False)))
        t = text_inputs(empty, [None], text_cache=None, guidance_scale=guidance)
        why = ("the config's text.conditioning=False" if conditioned is False
               else "no --caption or --text_embeddings given")
        info = dict(source="none", note=f"zero text embeddings (1, 1, {text_dim}), masked: the empty caption of a "
                                        f"model trained without captions ({why})")
        return t.text, t.mask, t.negative, t.negative_mask, info
    if flags.text_embeddings:
        text = _embeddings_npy(flags.text_embeddings, "--text_embeddings", text_dim)
        negative = negative_mask = None
        info = dict(source="--text_embeddings", text_embeddings=_file_record(flags.text_embeddings))
        if guidance != 1.0:
            if not flags.negative_embeddings:
                raise UserError(f"--guidance_scale {guidance:g} needs --negative_embeddings (the negative caption's); "
                                "or --guidance_scale 1 (off).")
            negative = _embeddings_npy(flags.negative_embeddings, "--negative_embeddings", text_dim)
            negative_mask = np.ones(negative.shape[:2], bool)
            info["negative_embeddings"] = _file_record(flags.negative_embeddings)
        return text, np.ones(text.shape[:2], bool), negative, negative_mask, info
    if flags.caption is None:
        raise UserError(f"the model is text-conditioned (--config {flags.config}: text.conditioning=True): give "
                        "--caption TEXT with --text_cache DIR (a umT5 cache holding it, written by "
                        f"`{EMBED_COMMAND}`), or --text_embeddings FILE.npy.")
    if not flags.text_cache:
        raise UserError(f"--caption needs --text_cache DIR, a umT5 text-embedding cache holding it ({EMBED_COMMAND}).")
    if not Path(flags.text_cache).is_dir():
        raise UserError(f"--text_cache {flags.text_cache} is not a directory ({EMBED_COMMAND} writes one).")
    max_length = DEFAULT_MAX_LENGTH if cfg is None else int(cfg.text.max_length)
    captions = [flags.caption] + ([negative_caption] if guidance != 1.0 else [])
    try:
        emb, mask = load_text_embeddings(flags.text_cache, captions, max_length=max_length)
    except (OSError, ValueError) as e:  # MissingTextEmbeddingsError: captions not cached; damaged entries
        raise UserError(f"--text_cache: {_one_line(e)}") from None
    if emb.shape[-1] != text_dim:
        raise UserError(f"--text_cache {flags.text_cache} holds {emb.shape[-1]}-wide embeddings, the transformer's "
                        f"text_dim is {text_dim}: give the cache of the model's text encoder.")
    info = dict(source="--caption", text_cache=str(Path(flags.text_cache).resolve()), max_length=max_length,
                negative_caption=negative_caption if guidance != 1.0 else None)
    neg = (emb[1:], mask[1:]) if guidance != 1.0 else (None, None)
    return emb[:1], mask[:1], *neg, info


def check_inputs(flags: Flags) -> Inputs:
    """Every flag checked and the keyframes, text and noise read, before any model loads (else a UserError)."""
    required = {"--vae": flags.vae, "--transformer": flags.transformer, "--keyframe": list(flags.keyframes),
                "--out": flags.out}
    if flags.config is None:
        required["--frames (or --config)"] = flags.frames
    missing = [flag for flag, value in required.items() if value in (None, [])]
    if missing:
        raise UserError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (see --help).")
    check_output(flags.out)
    cfg, config_record = (None, None) if flags.config is None else read_config(flags.config)
    vae_cfg = _read_json(flags.vae, "--vae")
    dit_cfg = _read_json(flags.transformer, "--transformer")
    z_dim = int(vae_cfg.get("z_dim", 16))
    if dit_cfg.get("in_channels") != z_dim or dit_cfg.get("out_channels") != z_dim:
        raise UserError(f"--transformer {flags.transformer} has in/out channels {dit_cfg.get('in_channels')}/"
                        f"{dit_cfg.get('out_channels')}, the VAE's latents {z_dim}: give a Director-Gen transformer "
                        "exported with this VAE.")
    if cfg is not None:
        _check_config_model(cfg, dit_cfg, flags)

    def setting(flag: str, value: Any, key: str, builtin: Any = None) -> tuple[str, Any]:
        """(what to call it in an error, the value): the flag's, else the config's video.KEY, else built-in."""
        if value is not None or cfg is None:
            return flag, builtin if value is None else value
        return f"the config's video.{key}", cfg.video[key]

    fps = _number(*setting("--fps", flags.fps, "fps", BUILTIN["fps"]), low=MIN_FPS, high=MAX_FPS)
    num_frames = _whole(*setting("--frames", flags.frames, "num_frames"))
    try:
        sampling = sampling_settings(_defaults(cfg), sampler=flags.sampler, steps=flags.steps, shift=flags.shift,
                                     guidance_scale=flags.guidance_scale, keyframe_guidance=flags.keyframe_guidance)
    except UserError as e:  # named by the settings' fields: say the flags
        raise UserError(f"--{e}") from None
    seed = _whole("--seed", flags.seed, low=0)
    if seed > MAX_SEED:
        raise UserError(f"--seed={seed}: give a seed from 0 to 2**63 - 1.")

    specs = [split_at(spec, "--keyframe") for spec in flags.keyframes]
    frames = [frame_of(when, fps, num_frames, "--keyframe") for _, when in specs]
    try:
        layout = Timeline.from_keyframes(num_frames, frames).layout
    except ValueError as e:
        raise UserError(f"--keyframe: {e}") from None
    if (flags.height is None) != (flags.width is None) and cfg is None:
        raise UserError("give --height and --width together (or neither: the first keyframe's size).")
    if flags.height is None and flags.width is None and cfg is None:
        height, width = _image_size(specs[0][0])
    else:
        height = _whole(*setting("--height", flags.height, "height"))
        width = _whole(*setting("--width", flags.width, "width"))
    spatial = int(vae_cfg.get("scale_factor_spatial", 8))
    patch = dit_cfg.get("patch_size", (1, 2, 2))
    fh, fw = spatial * int(patch[1]), spatial * int(patch[2])
    if height % fh or width % fw:
        raise UserError(f"the video size {width}x{height} (width x height) must be a multiple of {fw}x{fh} (VAE x "
                        "patch); set --height / --width.")

    given, keyframes = {}, []
    for (path, when), frame in zip(specs, frames, strict=True):
        given[frame] = to_float(read_image(path, height, width, resize=flags.resize))
        keyframes.append(dict(path=str(Path(path).resolve()), time=when, frame=frame, seconds=frame / fps,
                              sha256=sha256(path)))
    negative_caption = (flags.negative_caption if flags.negative_caption is not None
                        else str(_defaults(cfg).sampler.get("negative_prompt", "")))
    text_dim = int(dit_cfg.get("text_dim", 4096))
    text, mask, negative, negative_mask, text_info = _text(flags, cfg, text_dim, sampling.guidance_scale,
                                                           negative_caption)
    shape = noise_shape(layout, 1, height, width, z_dim, spatial)
    if flags.noise:
        noise = _read_npy(flags.noise, "--noise")
        if noise.shape != shape:
            raise UserError(f"--noise {flags.noise} has shape {noise.shape}; this timeline and size need {shape}.")
    else:
        noise = jax_noise(seed, shape)

    settings = dict(
        command=COMMAND, argv=None if flags.argv is None else list(flags.argv),
        config=config_record,
        defaults="the config's" if cfg is not None else "built-in (no --config)", sources=_sources(flags, cfg),
        vae=str(Path(flags.vae).resolve()), transformer=str(Path(flags.transformer).resolve()), device=flags.device,
        seed=None if flags.noise else seed, noise=_file_record(flags.noise) if flags.noise else None,
        steps=sampling.steps, sampler=sampling.sampler, shift=sampling.shift, guidance=sampling.guidance_scale,
        keyframe_guidance=sampling.keyframe_guidance, fps=fps, num_frames=num_frames, duration=num_frames / fps,
        height=height, width=width, keyframes=keyframes,
        caption=flags.caption, caption_used=text_info["source"] == "--caption", text=text_info,
        chunks=[dict(start=c.start, length=c.length, given_frames=c.given_frames) for c in layout.chunks],
    )
    return Inputs(layout, place_given_frames(num_frames, given)[None], keyframes, text, mask, negative, negative_mask,
                  noise, sampling, num_frames, fps, height, width, settings)
