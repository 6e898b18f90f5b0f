"""The showcase: every generation mode of docs/design.md run through ``python -m director_jax.generate``'s own code.

On a held-out synthetic movie (64x64, ground truth known): one keyframe at the first / middle /
last frame; the same three keyframes at two pacings; a two-shot clip with a keyframe per shot; and
extension forward, backward and in between from 5-frame conditioning videos. Each case writes the
generate command's mp4, contact sheet and JSON (with ``--sr``: Director-SR brings the 32x32 Gen
output to 64x64 with the 64x64 keyframes as anchors) and is scored against the true clip.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from director_jax.data.degradations import bicubic_upsample
from director_jax.data.synthetic import SyntheticMovieInfo
from director_jax.demo.data import downscale
from director_jax.eval.metrics import psnr
from director_jax.pipeline.generate import generate
from director_jax.pipeline.request import Request, plan
from director_jax.video_io import to_uint8, write_mp4

FRAMES = 17
CONTEXT = 5  # frames of a conditioning video


def cases(info: SyntheticMovieInfo) -> list[dict]:
    """Cases: name, first movie frame, keyframes as (offset, clip frame), videos as (offset, length, clip frame)."""
    cut = info.movie.shot_starts[1]
    last = FRAMES - 1
    return [
        dict(name="one keyframe, first frame", start=0, keyframes=[(0, 0)]),
        dict(name="one keyframe, middle frame", start=0, keyframes=[(8, 8)]),
        dict(name="one keyframe, last frame", start=0, keyframes=[(last, last)]),
        # the same three pictures; the middle one early (fast, then slow) or late (slow, then fast)
        dict(name="three keyframes, middle early", start=0, keyframes=[(0, 0), (8, 4), (last, last)]),
        dict(name="three keyframes, middle late", start=0, keyframes=[(0, 0), (8, 12), (last, last)]),
        dict(name="two shots, keyframe per shot", start=cut - 8, keyframes=[(0, 0), (8, 8), (last, last)]),
        dict(name="extension forward", start=0, videos=[(0, CONTEXT, 0)]),
        dict(name="extension backward", start=0, videos=[(FRAMES - CONTEXT, CONTEXT, FRAMES - CONTEXT)]),
        dict(name="extension in between", start=0,
             videos=[(0, CONTEXT, 0), (FRAMES - CONTEXT, CONTEXT, FRAMES - CONTEXT)]),
    ]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_").replace("__", "_")


def _png(path: Path, frame: np.ndarray) -> str:
    Image.fromarray(to_uint8(frame)).save(path)
    return str(path)


def run_case(case: dict, info: SyntheticMovieInfo, out_dir: Path, gen_cfg: ml_collections.ConfigDict,
             gen_ckpt: Path, sr_cfg: ml_collections.ConfigDict | None, sr_ckpt: Path | None, scale: int,
             seed: int) -> dict:
    """Writes the case's inputs (PNG keyframes, mp4 context videos), runs generate, scores against the true clip."""
    slug = _slug(case["name"])
    inputs = out_dir / "inputs" / slug
    inputs.mkdir(parents=True, exist_ok=True)
    s = case["start"]
    truth = info.movie.frames[s:s + FRAMES]  # 64x64
    keyframes = [f"{_png(inputs / f'keyframe_{at}.png', truth[off])}@#{at}" for off, at in case.get("keyframes", [])]
    videos = []
    for off, length, at in case.get("videos", []):
        path = write_mp4(inputs / f"context_{at}.mp4", downscale(truth[off:off + length], scale), info.movie.fps,
                         crf=0)
        videos.append(f"{path}@#{at}")
    use_sr = sr_ckpt is not None
    req = Request(config=gen_cfg, ckpt=str(gen_ckpt), out=str(out_dir / f"{slug}.mp4"), keyframes=keyframes,
                  videos=videos, frames=FRAMES, seed=seed, sr=use_sr, sr_ckpt=str(sr_ckpt) if use_sr else None,
                  sr_config=sr_cfg, progress=False, config_path=str(gen_ckpt / "config.py"),
                  sr_config_path=str(sr_ckpt / "config.py") if use_sr else None)
    if not use_sr:  # keyframes given at the movie's size: let generate resize them to Gen's
        req = Request(**{**req.__dict__, "resize": True})
    result = generate(req)
    given = sorted({at for _, at in case.get("keyframes", [])}
                   | {at + i for _, length, at in case.get("videos", []) for i in range(length)})
    generated = [f for f in range(FRAMES) if f not in given]
    small_truth = downscale(truth, scale)
    lowres = result["lowres"]
    row = {"name": case["name"], "file": f"{slug}.mp4", "sheet": f"{slug}.png", "given_frames": given,
           "chunks": result["chunks"], "gen_given_psnr": float(psnr(lowres[given], small_truth[given])),
           "gen_generated_psnr": float(psnr(lowres[generated], small_truth[generated]))}
    if use_sr:
        bicubic = bicubic_upsample(to_uint8(lowres), scale).astype(np.float32) / 127.5 - 1.0  # what SR starts from
        row.update(sr_psnr=float(psnr(result["frames"], truth)), bicubic_psnr=float(psnr(bicubic, truth)),
                   sr_keyframe_psnr=float(psnr(result["frames"][given], truth[given])) if given else None)
    row["_lowres"], row["_given"] = lowres, plan(req).given  # the given frames exactly as generate read them
    return row
