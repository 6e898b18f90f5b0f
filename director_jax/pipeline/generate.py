"""Generation as a library: a checked ``Request`` -> Director-Gen (and optionally Director-SR) -> files.

``generate(request)`` is what ``python -m director_jax.generate`` runs, and what the CPU demo and
notebooks call. It plans first (``pipeline/request.py``: every input read and checked, nothing
loaded), checks the checkpoints, reads the caption embeddings, then loads the models and samples.
It writes ``OUT.mp4`` (H.264), ``OUT.png`` (a contact sheet with the keyframe frames outlined) and
``OUT.json`` (the exact settings: seed, frames, times, checkpoint step, ...), each atomically; if
one of them fails the others are removed. The same settings and seed give the same video, bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import numpy as np

from director_jax.build import load_director_gen, load_director_sr, load_frozen_vae
from director_jax.errors import GenerateError
from director_jax.io_utils import atomic_write_text
from director_jax.models.timeline import place_given_frames
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.gen import generate_video
from director_jax.pipeline.request import Plan, Request, check_checkpoint, plan
from director_jax.pipeline.settings import text_inputs
from director_jax.pipeline.sr import super_resolve
from director_jax.video_io import contact_sheet, write_mp4

log = logging.getLogger(__name__)


def _text(req: Request, p: Plan):
    cfg = req.config
    if not cfg.text.conditioning:
        if p.caption:
            log.warning("the model was trained without captions (text.conditioning=False): the caption is ignored.")
    elif not p.caption:
        raise GenerateError("the model is text-conditioned: give --caption or --shot_caption (one per shot).")
    elif not req.text_cache:
        raise GenerateError("the model is text-conditioned: give --text_cache, a text-embedding cache holding the "
                            "caption (python -m director_jax.embed_text --captions FILE --cache DIR).")
    return text_inputs(cfg, [p.caption], text_cache=req.text_cache, guidance_scale=p.sampling.guidance_scale)


def generate(req: Request) -> dict:
    """Checks the inputs, generates the video and writes OUT.mp4, OUT.png and OUT.json.

    Returns the settings written to OUT.json, plus ``"frames"``: the generated (T, H, W, 3) float video in [-1, 1]
    (at the SR resolution with ``sr``) and ``"lowres"`` (the Gen output) for callers and tests.
    """
    cfg = req.config
    p = plan(req)
    check_checkpoint(req.ckpt, req.step)
    if req.sr:
        check_checkpoint(req.sr_ckpt, None, "--sr_ckpt")
    text = _text(req, p)
    s = p.sampling

    layout = p.timeline.layout
    log.debug("timeline:\n%s", layout.describe())
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    gen, loaded = load_director_gen(cfg, req.ckpt, sharding=sharding, step=req.step, weights=req.weights)
    vae = load_frozen_vae(cfg, sharding=sharding)
    encode, decode = jitted_codec(vae)
    given = place_given_frames(p.num_frames, p.given)[None]
    kw = {} if text.negative is None else {"negative_text": text.negative, "negative_mask": text.negative_mask}
    video, _ = generate_video(gen, vae, layout, given, text.text, key=jax.random.key(req.seed), encode=encode,
                              decode=decode, text_mask=text.mask, steps=s.steps, sampler=s.sampler, shift=s.shift,
                              guidance_scale=s.guidance_scale, keyframe_guidance=s.keyframe_guidance,
                              progress=req.progress, **kw)
    lowres = np.clip(np.asarray(video[0], np.float32), -1.0, 1.0)
    frames, sr_info = (_super_resolve(req, p, lowres, sharding) if req.sr else (lowres, None))

    settings = dict(
        command="python -m director_jax.generate", argv=None if req.argv is None else list(req.argv),
        config=req.config_path,
        checkpoint=dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights),
        seed=req.seed, steps=s.steps, sampler=s.sampler, shift=s.shift, guidance=s.guidance_scale,
        keyframe_guidance=s.keyframe_guidance,
        fps=p.fps, num_frames=p.num_frames, duration=p.num_frames / p.fps, height=int(frames.shape[1]),
        width=int(frames.shape[2]), gen_height=p.height, gen_width=p.width, resize=req.resize,
        keyframes=p.keyframes, videos=p.videos, caption=p.caption,
        caption_used=bool(cfg.text.conditioning and p.caption),
        chunks=[dict(start=c.start, length=c.length, given_frames=c.given_frames) for c in layout.chunks],
        sr=sr_info,
    )
    write_outputs(req.out, frames, p, settings, given[0])
    return dict(settings, frames=frames, lowres=lowres)


def _super_resolve(req: Request, p: Plan, lowres: np.ndarray, sharding) -> tuple[np.ndarray, dict]:
    """Director-SR (EMA weights when kept) over the same timeline, the full-resolution keyframes as anchors."""
    try:
        sr, loaded = load_director_sr(req.sr_config, req.sr_ckpt, sharding=sharding)
    except ValueError as e:
        raise GenerateError(f"--sr_ckpt: {e}") from None
    sr_vae = load_frozen_vae(req.sr_config, sharding=sharding)
    s = req.sr_config.sampler
    steps = int(s.steps if req.sr_steps is None else req.sr_steps)
    key = jax.random.fold_in(jax.random.key(req.seed), 1)
    video = super_resolve(sr, sr_vae, lowres, p.full_res_keyframes or None, scale=p.sr_scale, key=key,
                          layout=p.timeline.layout, steps=steps, sampler=str(s.name), shift=float(s.shift))
    checkpoint = dict(directory=loaded.directory, step=loaded.step, weights=loaded.weights)
    return np.asarray(video, np.float32), dict(checkpoint=checkpoint, config=req.sr_config_path, scale=p.sr_scale,
                                               steps=steps, sampler=str(s.name), shift=float(s.shift))


def write_outputs(out: str, frames: np.ndarray, p: Plan, settings: dict, given: np.ndarray | None = None) -> None:
    """OUT.mp4, OUT.png (keyframes outlined) and OUT.json, each atomically; on a failure none is left behind."""
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
