"""Trainer runs -> one diffusers-style pipeline directory that ``SmartDirectorPipeline.from_pretrained`` loads.

``python -m director_jax.convert export --model pipeline --src GEN_RUN [--sr_src SR_RUN] --out DIR`` writes:

* ``transformer/``: the Gen run's EMA (or raw) weights as a Wan transformer (diffusers names);
* ``vae/``: the VAE the Gen run encoded with (``vae.init_from``, or the run's own random VAE), its
  latent statistics in ``config.json``;
* ``scheduler/``: the diffusers scheduler with the Gen sampler's sigma table (UniPC or Euler, its shift);
* with ``--sr_src``: ``sr_transformer/``, ``sr_scheduler/``, and ``sr_vae/`` only when SR's VAE differs;
* with ``--text_encoder``: ``text_encoder/`` + ``tokenizer/`` copied from a Wan diffusers release;
* ``model_index.json``: those components and ``director_config``, the runs' settings a call defaults to
  (video size and fps, frames, sampler, guidance, text conditioning, the SR scale and sampler).

Every input is read and checked before anything is written; the directory is staged beside ``--out``
and moved into place whole, so a failed export leaves no half-written pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from director_jax.build.checkpoints import step_directory
from director_jax.build.models import load_frozen_vae
from director_jax.build.reuse import read_run_for_export, recorded_run_config
from director_jax.convert.dit import export_transformer
from director_jax.convert.state_dict import EXPORT_DTYPES
from director_jax.convert.vae import export_vae
from director_jax.diffusion.diffusers_schedulers import scheduler_config
from director_jax.errors import UserError
from director_jax.models.vae import WanVAE

DIFFUSERS_VERSION = "0.42.1"  # the diffusers this export is tested with (requirements-test.txt)
TRANSFORMER_CLASS = ["director_jax.pytorch.modules", "DirectorWanTransformer3DModel"]
NONE = [None, None]


def _run(src: str, step: int | None, model: str, weights: str) -> tuple[Any, ml_collections.ConfigDict, Any]:
    """(the exported model, the run's recorded config, which step and weights) of one trainer run."""
    if step is not None:
        try:
            src = os.fspath(step_directory(src, step)[0])
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{src}: {' '.join(str(e).split())}") from None
    built, _, loaded = read_run_for_export(model, src, weights=weights)
    config = recorded_run_config(epath.Path(loaded.directory), loaded.step)
    return built, ml_collections.ConfigDict(config), loaded


def _frozen_vae(cfg: ml_collections.ConfigDict, what: str) -> WanVAE:
    try:
        return load_frozen_vae(cfg, sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{what}: its VAE does not load ({' '.join(str(e).split())}).") from None


def _same_vae(a: WanVAE, b: WanVAE) -> bool:
    if a.config != b.config:
        return False
    left, right = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    return len(left) == len(right) and all(np.array_equal(x, y) for x, y in zip(left, right, strict=True))


def _settings(gen_cfg: ml_collections.ConfigDict, sr_cfg: ml_collections.ConfigDict | None) -> dict[str, Any]:
    v, s = gen_cfg.video, gen_cfg.sampler
    out = dict(fps=float(v.fps), num_frames=int(v.num_frames), height=int(v.height), width=int(v.width),
               sampler=str(s.name), steps=int(s.steps), shift=float(s.shift), guidance_scale=float(s.guidance_scale),
               keyframe_guidance=float(s.get("keyframe_guidance", 1.0)), negative_prompt=str(s.negative_prompt),
               text_conditioning=bool(gen_cfg.text.conditioning), text_max_length=int(gen_cfg.text.max_length))
    if sr_cfg is not None:
        sh, sw = int(sr_cfg.video.height), int(sr_cfg.video.width)
        if sh % out["height"] or sw % out["width"] or sh // out["height"] != sw // out["width"]:
            raise UserError(f"the SR run's video is {sw}x{sh}, not a whole multiple of the Gen run's "
                            f"{out['width']}x{out['height']}: export an SR run trained for this Gen model.")
        out.update(sr_scale=sh // out["height"], sr_sampler=str(sr_cfg.sampler.name),
                   sr_steps=int(sr_cfg.sampler.steps), sr_shift=float(sr_cfg.sampler.shift))
    return out


def _text_encoder_dirs(path: str) -> tuple[Path, Path]:
    root = Path(path).expanduser()
    if (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir():
        return root / "text_encoder", root / "tokenizer"
    raise UserError(f"--text_encoder {path}: expected a Wan diffusers release root (text_encoder/ with config.json, "
                    "and tokenizer/).")


def export_pipeline(gen_src: str, out: str, *, sr_src: str | None = None, weights: str = "auto",
                    dtype: str = "float32", step: int | None = None, sr_step: int | None = None,
                    text_encoder: str | None = None) -> str:
    """Writes the pipeline directory (see the module docstring); returns a one-line summary."""
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}.")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir())
                                                       or (out_dir / "model_index.json").is_file())):
        raise UserError(f"--out {out} exists and is not an earlier pipeline export: choose a new directory.")
    dit, gen_cfg, gen_loaded = _run(gen_src, step, "dit", weights)
    vae = _frozen_vae(gen_cfg, f"--src {gen_src}")
    sr = sr_cfg = sr_loaded = sr_vae = None
    if sr_src is not None:
        sr, sr_cfg, sr_loaded = _run(sr_src, sr_step, "sr", weights)
        sr_vae = _frozen_vae(sr_cfg, f"--sr_src {sr_src}")
        if sr.dit.config.text_dim != dit.config.text_dim:
            raise UserError(f"--sr_src {sr_src} reads {sr.dit.config.text_dim}-wide text, the Gen run "
                            f"{dit.config.text_dim}: export runs trained together.")
    settings = _settings(gen_cfg, sr_cfg)
    encoder_dirs = _text_encoder_dirs(text_encoder) if text_encoder else None
    if settings["text_conditioning"] and encoder_dirs is None:
        settings["note"] = "text-conditioned: pass prompt_embeds, or re-export with --text_encoder"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        index: dict[str, Any] = {"_class_name": "SmartDirectorPipeline", "_diffusers_version": DIFFUSERS_VERSION}
        export_transformer(dit, staging / "transformer", dtype=dtype)
        export_vae(vae, staging / "vae", dtype=dtype)
        index.update(transformer=TRANSFORMER_CLASS, vae=["diffusers", "AutoencoderKLWan"],
                     scheduler=_write_scheduler(staging / "scheduler", settings["sampler"], settings["shift"]),
                     sr_transformer=NONE, sr_vae=NONE, sr_scheduler=NONE, text_encoder=NONE, tokenizer=NONE)
        if sr is not None:
            export_transformer(sr.dit, staging / "sr_transformer", dtype=dtype)
            index.update(sr_transformer=TRANSFORMER_CLASS, sr_scheduler=_write_scheduler(
                staging / "sr_scheduler", settings["sr_sampler"], settings["sr_shift"]))
            if not _same_vae(vae, sr_vae):
                export_vae(sr_vae, staging / "sr_vae", dtype=dtype)
                index["sr_vae"] = ["diffusers", "AutoencoderKLWan"]
        if encoder_dirs is not None:
            shutil.copytree(encoder_dirs[0], staging / "text_encoder")
            shutil.copytree(encoder_dirs[1], staging / "tokenizer")
            index.update(text_encoder=["transformers", "UMT5EncoderModel"],
                         tokenizer=["transformers", "AutoTokenizer"])
        index["director_config"] = dict(settings, exported_from=dict(
            gen=dict(run=str(gen_loaded.directory), step=gen_loaded.step, weights=gen_loaded.weights),
            sr=None if sr_loaded is None else dict(run=str(sr_loaded.directory), step=sr_loaded.step,
                                                   weights=sr_loaded.weights)), dtype=dtype)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        previous = None
        if out_dir.exists():  # an earlier export: moved aside, replaced, then removed
            previous = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, previous / "pipeline")
        os.replace(staging, out_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    parts = "Gen" + (" + SR" if sr is not None else "") + (" + umT5" if encoder_dirs else "")
    return (f"exported pipeline ({parts}, {dtype}): Gen step {gen_loaded.step} ({gen_loaded.weights})"
            + (f", SR step {sr_loaded.step} ({sr_loaded.weights})" if sr_loaded else "")
            + f" -> {out_dir} (SmartDirectorPipeline.from_pretrained)")


def _write_scheduler(directory: Path, sampler: str, shift: float) -> list[str]:
    config = dict(scheduler_config(sampler, shift), _diffusers_version=DIFFUSERS_VERSION)
    directory.mkdir(parents=True)
    (directory / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["diffusers", config["_class_name"]]
