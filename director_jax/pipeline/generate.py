"""Generation as a library: a checked ``Request`` -> Director-Gen (and optionally Director-SR) -> files.

``generate(request)`` is what ``python -m director_jax.generate`` runs, and what the CPU demo and
notebooks call. It plans first (``pipeline/request.py``: every input read and checked, nothing
loaded), checks the checkpoints, reads the caption embeddings, then loads the models and samples.
It writes ``OUT.mp4`` (H.264), ``OUT.png`` (a contact sheet with the keyframe frames outlined) and
``OUT.json`` (the exact settings: seed, frames, times, checkpoint step, ..., and the SHA-256 of the other two)
as one unit: all three are written into a staging directory beside OUT and then moved into place, OUT.json
removed first and renamed last (``io_utils.publish_together``), so a reader never sees a new video with the
previous run's settings, and a set is complete when OUT.json is there and its hashes match. A lock on
``OUT.lock`` (``OUT`` + ``.lock``) held from the first load to the last move keeps two runs to one output from
interleaving; a run killed while writing leaves the previous set intact and its staging directory is removed
by the next run. A video with NaN or infinite values is an error, not a file. The same settings and seed give
the same video, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from director_jax.build import (
    check_config_matches,
    load_director_gen,
    load_director_sr,
    load_frozen_vae,
    step_directory,
)
from director_jax.build.reuse import is_trainer_run
from director_jax.convert.umt5 import find_text_encoder
from director_jax.errors import GenerateError, UserError
from director_jax.io_utils import LockHeldError, atomic_write_text, exclusive_lock, publish_together, recover_file_set
from director_jax.models.timeline import place_given_frames
from director_jax.parallel.mesh import inference_mesh
from director_jax.parallel.rules import MeshContext, param_shardings, rules_from_config
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.gen import generate_video
from director_jax.pipeline.request import Plan, Request, check_checkpoint, plan
from director_jax.pipeline.settings import text_inputs
from director_jax.pipeline.sr import super_resolve
from director_jax.pipeline.text_encoder import JaxTextEncoder
from director_jax.video_io import check_finite, contact_sheet, write_mp4

log = logging.getLogger(__name__)


def _text(req: Request, p: Plan, placement: InferencePlacement):
    cfg = req.config
    if not cfg.text.conditioning:
        if p.caption:
            log.warning("the model was trained without captions (text.conditioning=False): the caption is ignored.")
    elif not p.caption:
        raise GenerateError("the model is text-conditioned: give --caption or --shot_caption (one per shot).")
    elif req.text_encoder and req.text_cache:
        raise GenerateError("give --text_encoder (embed the caption now) or --text_cache (read it from a cache), "
                            "not both.")
    elif not (req.text_cache or req.text_encoder):
        raise GenerateError("the model is text-conditioned: give --text_encoder, the umT5 encoder's directory (a Wan "
                            "diffusers or official release), or --text_cache, a text-embedding cache holding the "
                            "caption (python -m director_jax.embed_text --captions FILE --cache DIR).")
    encoder = None
    if cfg.text.conditioning and req.text_encoder:
        try:
            width = find_text_encoder(req.text_encoder, req.tokenizer).config.d_model
            if width != int(cfg.model.text_dim):  # before loading its weights
                raise ValueError(f"the encoder gives {width}-wide embeddings, the model reads "
                                 f"model.text_dim={int(cfg.model.text_dim)}: pass the umT5 encoder the model was "
                                 "trained with.")
            mesh = placement.mesh  # on a mesh the encoder is sharded like the DiT (umT5-XXL is 11 GB in bfloat16)
            encoder = JaxTextEncoder(req.text_encoder, dtype=req.text_dtype, max_length=int(cfg.text.max_length),
                                     tokenizer=req.tokenizer, shardings=None if mesh is None else (
                                         lambda abstract: param_shardings(abstract, mesh, rules_from_config(cfg))))
        except (FileNotFoundError, ValueError) as e:
            raise GenerateError(f"--text_encoder: {_one_line(e)}") from None
    try:
        return text_inputs(cfg, [p.caption], text_cache=req.text_cache, guidance_scale=p.sampling.guidance_scale,
                           text_encoder=encoder)
    except UserError as e:
        raise GenerateError(str(e)) from None


def generate(req: Request) -> dict:
    """Checks the inputs, generates the video and writes OUT.mp4, OUT.png and OUT.json.

    Returns the settings written to OUT.json, plus ``"frames"``: the generated (T, H, W, 3) float video in [-1, 1]
    (at the SR resolution with ``sr``) and ``"lowres"`` (the Gen output) for callers and tests.
    """
    p = plan(req)
    placement = inference_placement(req.mesh, req.dtype)
    check_checkpoint(req.ckpt, req.step)
    if req.sr:
        check_checkpoint(req.sr_ckpt, None, "--sr_ckpt")
    if not req.allow_config_mismatch:
        _check_configs(req)
    text = _text(req, p, placement)
    with output_lock(req.out):
        return _generate(req, p, text, placement)


@dataclasses.dataclass(frozen=True)
class InferencePlacement:
    """Where the models run: a mesh (weights sharded by the config's rules) or one device, and in which dtype."""

    mesh: Mesh | None
    dtype: str  # "bfloat16" or "float32": weights and compute

    def weights(self) -> jax.sharding.Sharding | Mesh:
        return self.mesh if self.mesh is not None else SingleDeviceSharding(jax.local_devices()[0])

    def replicated(self) -> jax.sharding.Sharding:
        return NamedSharding(self.mesh, PartitionSpec()) if self.mesh is not None else self.weights()

    def context(self, cfg) -> MeshContext:
        return None if self.mesh is None else (self.mesh, rules_from_config(cfg))

    def describe(self) -> dict:
        sizes = {} if self.mesh is None else {a: int(n) for a, n in self.mesh.shape.items() if n > 1}
        return dict(devices=1 if self.mesh is None else int(self.mesh.size), mesh=sizes, dtype=self.dtype)


def inference_placement(mesh: str, dtype: str) -> InferencePlacement:
    """``--mesh`` and ``--dtype`` checked (``auto`` dtype: bfloat16 on TPU / GPU, float32 on a CPU)."""
    try:
        built = inference_mesh(mesh)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if dtype == "auto":
        dtype = "float32" if jax.local_devices()[0].platform == "cpu" else "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise GenerateError(f"--dtype {dtype!r}: choose auto, bfloat16 or float32.")
    return InferencePlacement(built, dtype)


def _check_configs(req: Request) -> None:
    """--config (and --sr_config) against the configs their checkpoints were trained with."""
    pairs = [(req.config, req.ckpt, req.step, "--config")]
    if req.sr:
        pairs.append((req.sr_config, req.sr_ckpt, None, "--sr_config"))
    for cfg, ckpt, step, what in pairs:
        if not is_trainer_run(ckpt):  # a weight source: its transformer's shape is checked when it is read
            continue
        try:
            check_config_matches(cfg, step_directory(ckpt, step)[0], what=what, override="--allow_config_mismatch")
        except UserError as e:
            raise GenerateError(str(e)) from None


def output_paths(out: str) -> tuple[Path, Path, Path]:
    """OUT.mp4, OUT.png and OUT.json: the set, its manifest (the JSON) last."""
    mp4 = Path(out)
    return mp4, mp4.with_suffix(".png"), mp4.with_suffix(".json")


@contextlib.contextmanager
def output_lock(out: str, targets: Sequence[Path] | None = None, *, command: str = "generate") -> Iterator[None]:
    """Holds OUT.lock (``--out`` + ``.lock``) or refuses at once; cleans up after a killed run to the same OUT.

    ``targets``: the file set published together (default: generate's OUT.mp4, .png, .json); ``command`` names
    the other run in the refusal (the PyTorch command shares this lock protocol).
    """
    try:
        with exclusive_lock(str(out) + ".lock"):
            for line in recover_file_set(output_paths(out) if targets is None else targets):
                log.warning("a previous run to %s was killed: %s.", out, line)
            yield
    except LockHeldError as e:
        who = f" (pid {e.holder})" if e.holder else ""
        raise GenerateError(f"another {command}{who} is writing {out}: wait for it to finish, or choose another "
                            f"--out (its lock is {e.path}).") from None


def _generate(req: Request, p: Plan, text, placement: InferencePlacement) -> dict:
    cfg = req.config
    s = p.sampling
    layout = p.timeline.layout
    log.debug("timeline:\n%s", layout.describe())
    try:
        gen, loaded = load_director_gen(cfg, req.ckpt, sharding=placement.weights(), step=req.step,
                                        weights=req.weights, dtype=placement.dtype)
    except (FileNotFoundError, ValueError) as e:  # a damaged step, weights that do not fit the config
        raise GenerateError(f"--ckpt: {_one_line(e)}") from None
    vae = load_frozen_vae(cfg, sharding=placement.replicated())
    encode, decode = jitted_codec(vae)
    given = place_given_frames(p.num_frames, p.given)[None]
    kw = {} if text.negative is None else {"negative_text": text.negative, "negative_mask": text.negative_mask}
    video, _ = generate_video(gen, vae, layout, given, text.text, key=jax.random.key(req.seed), encode=encode,
                              decode=decode, text_mask=text.mask, steps=s.steps, sampler=s.sampler, shift=s.shift,
                              guidance_scale=s.guidance_scale, keyframe_guidance=s.keyframe_guidance,
                              progress=req.progress, mesh_context=placement.context(cfg), **kw)
    lowres = np.asarray(video[0], np.float32)
    _check_generated(lowres, "Director-Gen")
    lowres = np.clip(lowres, -1.0, 1.0)
    frames, sr_info = (_super_resolve(req, p, lowres, placement) if req.sr else (lowres, None))
    if req.sr:
        _check_generated(frames, "Director-SR")

    settings = dict(
        command="python -m director_jax.generate", argv=None if req.argv is None else list(req.argv),
        config=req.config_path,
        checkpoint=dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights,
                        skipped=list(loaded.skipped)),
        placement=placement.describe(), seed=req.seed, steps=s.steps, sampler=s.sampler, shift=s.shift,
        guidance=s.guidance_scale, keyframe_guidance=s.keyframe_guidance,
        fps=p.fps, num_frames=p.num_frames, duration=p.num_frames / p.fps, height=int(frames.shape[1]),
        width=int(frames.shape[2]), gen_height=p.height, gen_width=p.width, resize=req.resize,
        keyframes=p.keyframes, videos=p.videos, caption=p.caption,
        caption_used=bool(cfg.text.conditioning and p.caption), text=_text_source(req),
        chunks=[dict(start=c.start, length=c.length, given_frames=c.given_frames) for c in layout.chunks],
        sr=sr_info,
        keyframe_psnr_db=keyframe_psnr(lowres, {k["frame"]: p.given[k["frame"]] for k in p.keyframes}),
    )
    if req.sr and p.full_res_keyframes:
        settings["sr"]["keyframe_psnr_db"] = keyframe_psnr(frames, p.full_res_keyframes)
    write_outputs(req.out, frames, p, settings, given[0])
    return dict(settings, frames=frames, lowres=lowres)


def _text_source(req: Request) -> dict | None:
    """Where the caption's embedding came from, for OUT.json."""
    if not (req.config.text.conditioning and (req.caption or req.shot_captions)):
        return None
    if req.text_encoder:
        return dict(encoder=str(req.text_encoder), tokenizer=req.tokenizer, dtype=req.text_dtype)
    return dict(cache=str(req.text_cache))


def keyframe_psnr(frames: np.ndarray, keyframes: dict[int, np.ndarray]) -> dict[str, float]:
    """PSNR (dB, frames in [-1, 1]) of each keyframe's output frame against its image: how well it came back.

    Given frames pass through the VAE, so this is the VAE round trip of the image (100 when exact).
    """
    out = {}
    for frame, image in sorted(keyframes.items()):
        mse = float(np.mean(np.square(np.clip(frames[frame], -1, 1) - np.asarray(image, np.float32))))
        out[str(frame)] = round(100.0 if mse == 0 else min(100.0, 10 * math.log10(4.0 / mse)), 2)
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _check_generated(frames: np.ndarray, what: str) -> None:
    try:
        check_finite(frames)
    except ValueError as e:
        raise GenerateError(f"{what} generated a video with NaN or infinite values ({e}): the checkpoint's weights "
                            "or the sampling settings (guidance, shift) are not usable; nothing was written.") from None


def _super_resolve(req: Request, p: Plan, lowres: np.ndarray, placement: InferencePlacement
                   ) -> tuple[np.ndarray, dict]:
    """Director-SR (EMA weights when kept) over the same timeline, the full-resolution keyframes as anchors."""
    try:
        sr, loaded = load_director_sr(req.sr_config, req.sr_ckpt, sharding=placement.weights(),
                                      dtype=placement.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise GenerateError(f"--sr_ckpt: {_one_line(e)}") from None
    sr_vae = load_frozen_vae(req.sr_config, sharding=placement.replicated())
    s = req.sr_config.sampler
    steps = int(s.steps if req.sr_steps is None else req.sr_steps)
    key = jax.random.fold_in(jax.random.key(req.seed), 1)
    video = super_resolve(sr, sr_vae, lowres, p.full_res_keyframes or None, scale=p.sr_scale, key=key,
                          layout=p.timeline.layout, steps=steps, sampler=str(s.name), shift=float(s.shift),
                          mesh_context=placement.context(req.sr_config))
    checkpoint = dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights,
                      skipped=list(loaded.skipped))
    return np.asarray(video, np.float32), dict(checkpoint=checkpoint, config=req.sr_config_path, scale=p.sr_scale,
                                               steps=steps, sampler=str(s.name), shift=float(s.shift))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_outputs(out: str, frames: np.ndarray, p: Plan, settings: dict, given: np.ndarray | None = None) -> None:
    """OUT.mp4, OUT.png (keyframes outlined) and OUT.json published as one unit (see the module's docstring).

    OUT.json gains ``files``: the names and SHA-256 of OUT.mp4 and OUT.png. Frames with NaN / infinite values and
    settings that are not valid JSON (NaN) are refused before anything is written; on any failure the previous
    set stays as it was. Call while holding ``output_lock(out)`` (``generate`` does).
    """
    mp4, sheet, sidecar = output_paths(out)
    _check_generated(frames, "the pipeline")
    json.dumps(settings, allow_nan=False, default=str)  # ValueError on NaN / inf before anything is written
    marked = [k["frame"] for k in p.keyframes]
    with publish_together([mp4, sheet, sidecar]) as staging:
        write_mp4(staging / mp4.name, frames, p.fps)
        scale = max(1, math.ceil(64 / max(frames.shape[1:3])))
        rows = [("generated", frames)]
        if given is not None and given.shape == frames.shape:
            rows.append(("given", given))
        contact_sheet(staging / sheet.name, rows, marked=marked, scale=scale)
        settings["files"] = {path.suffix[1:]: dict(name=path.name, sha256=_sha256(staging / path.name))
                             for path in (mp4, sheet)}
        atomic_write_text(staging / sidecar.name,
                          json.dumps(settings, indent=2, default=str, allow_nan=False) + "\n")
