"""The demo's training stages: the VAE, Director-Gen and Director-SR, each written where the commands read it.

The VAE goes to ``WORKDIR/vae`` (a diffusers directory with its measured latent statistics), Gen
and SR to trainer checkpoints under ``WORKDIR/gen`` and ``WORKDIR/sr`` with their config beside
them as ``config.py``, so ``python -m director_jax.generate --config WORKDIR/gen/config.py --ckpt
WORKDIR/gen`` and ``python -m director_jax.evaluate`` work on the demo's models as on any run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from director_jax.configs_common import load_config
from director_jax.convert.state_dict import write_diffusers_dir
from director_jax.convert.vae import load_vae
from director_jax.convert.vae_weights import export_diffusers_state_dict
from director_jax.curation.latent_writer import OtherJobError, write_latent_cache
from director_jax.curation.shards import build_curated_dataset
from director_jax.demo.cpu_fit import fit_vae, with_latent_stats
from director_jax.demo.data import downscale, training_windows
from director_jax.io_utils import atomic_write_text
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.models.vae_init import inflate_temporal_kernels, scale_conv_kernels
from director_jax.train.trainer import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAE_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")


def vae_section(cfg: ml_collections.ConfigDict) -> dict:
    return {k: cfg.vae[k] for k in VAE_FIELDS}


def write_config_file(path: Path, cfg: ml_collections.ConfigDict, what: str) -> Path:
    """``cfg`` as a config file the commands take (``--config path``): JSON inside a ``get_config()``."""
    text = (f'"""{what}: written by the CPU demo (director_jax/demo/stages.py)."""\n\nimport json\n\n'
            f"import ml_collections\n\n_CONFIG = {json.dumps(cfg.to_dict())!r}\n\n\n"
            "def get_config() -> ml_collections.ConfigDict:\n"
            "    return ml_collections.ConfigDict(json.loads(_CONFIG))\n")
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------------------------
# VAE


def fit_demo_vae(cfg: ml_collections.ConfigDict, samples: list[dict], workdir: Path, *, progress: bool = True
                 ) -> tuple[WanVAE, list[dict]]:
    """The VAE fitted on the curated clips at both resolutions it serves (Gen's 32 px and crops of SR's 64 px)."""
    v = cfg.vae
    vae = WanVAE(WanVAEConfig(**vae_section(cfg)), rngs=nnx.Rngs(int(cfg.seed)))
    scale_conv_kernels(vae, float(v.init_scale))
    if v.get("inflate", False):
        inflate_temporal_kernels(vae)
    factor, crop, frames = int(cfg.data.sr_scale), int(v.crop), int(cfg.data.gen_frames)

    def views(clips: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        """Half Gen's view (downscaled), half SR's (full resolution); random ``size`` crops of either."""
        out = []
        for clip in clips:
            if rng.random() < 0.5:
                clip = downscale(clip, factor)
            y, x = rng.integers(0, clip.shape[1] - size + 1, size=2)
            out.append(clip[:, y:y + size, x:x + size])
        return np.stack(out)

    def sample(i: int, rng: np.random.Generator) -> np.ndarray:
        if i % int(v.clip_every) == int(v.clip_every) - 1:  # the temporal path: small crops, so several clips
            return views(training_windows(samples, int(v.clip_batch), frames, rng), rng, int(v.clip_crop))
        return views(training_windows(samples, int(v.frame_batch), 1, rng), rng, crop)

    history = fit_vae(vae, sample, int(v.steps), learning_rate=float(v.learning_rate), seed=int(cfg.seed),
                      mse_weight=float(v.mse_weight), anchor_weight=float(v.get("anchor_weight", 0.0)),
                      progress=progress)
    stats_clips = downscale(training_windows(samples, 32, frames, np.random.default_rng(int(cfg.seed) + 5)), factor)
    with_latent_stats(vae, stats_clips)
    write_diffusers_dir(workdir / "vae", vae.config.to_diffusers_config(), export_diffusers_state_dict(vae),
                        "AutoencoderKLWan")
    return vae, history


# ------------------------------------------------------------------------------------------------
# Director-Gen and Director-SR: configs and runs of the trainer


def _common(c: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
            workdir: Path) -> ml_collections.ConfigDict:
    """What Gen and SR share: the demo's VAE, clips, curated shards, per-example tasks and training budget."""
    c.seed = int(cfg.seed)
    c.vae.update(vae_section(cfg))
    c.model.update(dict(in_channels=int(cfg.vae.z_dim), out_channels=int(cfg.vae.z_dim)))  # the DiT over its latents
    c.vae.init_from = str((workdir / "vae").resolve())
    c.video.num_frames = int(cfg.data.gen_frames)
    c.video.fps = float(cfg.data.fps)
    c.data.curated.update(dict(dir=str((workdir / "curated").resolve()), fps=float(cfg.data.fps)))
    c.data.source = "latents"  # python -m director_jax.encode's cache of the curated clips
    c.data.latents.dir = str((workdir / "latents" / c.task).resolve())
    c.train.latents = "precomputed"
    c.data.tasks.update(cfg.tasks.to_dict())
    c.train.update(dict(steps=int(section.steps), batch_size=int(section.batch_size), timelines="per_example",
                        latent_buckets=tuple(section.get("latent_buckets", ())), log_every=50))
    c.optim.update(dict(learning_rate=float(section.learning_rate), warmup_steps=int(section.warmup_steps),
                        ema_decay=float(section.ema_decay)))
    c.checkpoint.update(dict(every=int(section.steps), keep_last=1, async_save=False))
    c.sampler.steps = int(section.sampler_steps)
    return c


def gen_config(cfg: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """``configs/gen_tiny.py`` at the demo's size, VAE and budget."""
    c = _common(load_config(CONFIGS / "gen_tiny.py"), cfg, cfg.gen, workdir)
    size = int(cfg.data.size) // int(cfg.data.sr_scale)
    c.video.update(dict(height=size, width=size))
    c.sampler.update(dict(name="euler", shift=1.0, guidance_scale=1.0,
                          keyframe_guidance=float(cfg.gen.get("keyframe_guidance", 1.0))))
    c.flow.timestep_sampling = str(cfg.gen.timestep_sampling)
    c.train.keyframe_dropout = float(cfg.gen.get("keyframe_dropout", 0.0))
    return c


def sr_config(cfg: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """``configs/sr_tiny.py`` at the demo's size and scale."""
    c = _common(load_config(CONFIGS / "sr_tiny.py"), cfg, cfg.sr, workdir)
    c.video.update(dict(height=int(cfg.data.size), width=int(cfg.data.size)))
    c.degradation.scales = (int(cfg.data.sr_scale),)
    c.train.keyframe_dropout = float(cfg.sr.keyframe_dropout)
    return c


def build_shards(workdir: Path, *, progress: bool = True) -> Path:
    """The curated clips as TFDS shards (``WORKDIR/curated/tfds``), what the trainer and the encoder read."""
    build_curated_dataset(workdir / "curated", progress=progress)
    return workdir / "curated" / "tfds"


def encode_latents(run_cfg: ml_collections.ConfigDict, timelines_per_clip: int, vae: WanVAE, *,
                   progress: bool = True) -> dict:
    """``python -m director_jax.encode``'s job for ``run_cfg``: seeded timelines of every curated clip.

    A cache left by an earlier run is kept when it is this job's (same VAE, clips, tasks), else rewritten.
    Returns what the report shows: examples, megabytes, seconds.
    """
    cache = Path(run_cfg.data.latents.dir)
    kw = dict(timelines_per_clip=int(timelines_per_clip), shard_size=64, batch=8, latent_dtype="float32",
              decode_workers=2, vae=vae, progress=progress)
    t0 = time.perf_counter()
    try:
        manifest = write_latent_cache(run_cfg, cache, **kw)
    except OtherJobError:  # an earlier demo run's (another VAE fit, other settings): the demo's own to replace
        shutil.rmtree(cache)
        manifest = write_latent_cache(run_cfg, cache, **kw)
    return {"examples": manifest["count"], "megabytes": round(manifest["bytes"] / 1e6, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def _trainer_run(run_cfg: ml_collections.ConfigDict, out: Path, what: str, *, progress: bool) -> dict:
    """``python -m director_jax.train --config OUT/config.py --workdir OUT`` (a fresh run); returns its loss log."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh model: no steps of an earlier run mixed in
    out.mkdir(parents=True)
    write_config_file(out / "config.py", run_cfg, what)
    t0 = time.perf_counter()
    result = train(run_cfg, out, devices=jax.devices()[:1], progress=progress)
    seconds = round(time.perf_counter() - t0, 1)
    every = int(run_cfg.train.log_every)
    steps = sorted(result.losses)
    history = [{"step": steps[min(i + every, len(steps)) - 1],
                "loss": float(np.mean([result.losses[k] for k in steps[i:i + every]]))}
               for i in range(0, len(steps), every)]
    report = {"history": history, "nonfinite_skips": result.nonfinite_skips, "seconds": seconds,
              "steps_per_second": round(len(steps) / seconds, 2)}
    atomic_write_text(out / "train_log.json", json.dumps(report))
    return report


def train_gen(cfg: ml_collections.ConfigDict, vae: WanVAE, workdir: Path, *, progress: bool = True
              ) -> tuple[ml_collections.ConfigDict, dict]:
    """Director-Gen through the trainer on the latent cache of the curated clips (per-example timelines)."""
    gcfg = gen_config(cfg, workdir)
    encode = encode_latents(gcfg, int(cfg.gen.timelines_per_clip), vae, progress=progress)
    report = _trainer_run(gcfg, workdir / "gen", "Director-Gen of the CPU demo", progress=progress)
    return gcfg, {**report, "latent_cache": encode}


def train_sr(cfg: ml_collections.ConfigDict, vae: WanVAE, workdir: Path, *, progress: bool = True
             ) -> tuple[ml_collections.ConfigDict, dict]:
    """Director-SR through the trainer on its latent cache: the curated clips degraded by the SR task's seeded
    data path, both encoded per example."""
    scfg = sr_config(cfg, workdir)
    encode = encode_latents(scfg, int(cfg.sr.timelines_per_clip), vae, progress=progress)
    report = _trainer_run(scfg, workdir / "sr", "Director-SR of the CPU demo", progress=progress)
    return scfg, {**report, "latent_cache": encode}


def reused_vae(workdir: Path) -> WanVAE:
    """The VAE a previous run wrote to ``workdir/vae`` (``--reuse vae``)."""
    return load_vae(workdir / "vae")


def reused(model_dir: Path) -> tuple[ml_collections.ConfigDict, dict]:
    """The config and training log a previous run wrote beside its checkpoint (``--reuse gen`` / ``sr``)."""
    log = json.loads((model_dir / "train_log.json").read_text())
    return load_config(model_dir / "config.py"), {**log, "note": "reused"}


def devices_note() -> str:
    return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
