"""The demo's training stages: the VAE, Director-Gen and Director-SR, each written where the commands read it.

The VAE goes to ``WORKDIR/vae`` (a diffusers directory with its measured latent statistics), Gen
and SR to trainer checkpoints under ``WORKDIR/gen`` and ``WORKDIR/sr`` with their config beside
them as ``config.py``, so ``python -m director_jax.generate --config WORKDIR/gen/config.py --ckpt
WORKDIR/gen`` and ``python -m director_jax.evaluate`` work on the demo's models as on any run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from director_jax.configs_common import load_config
from director_jax.convert.state_dict import write_diffusers_dir
from director_jax.convert.vae import load_vae
from director_jax.convert.vae_weights import export_diffusers_state_dict
from director_jax.demo.cpu_fit import (
    LayoutCache,
    encode_layouts,
    fit_vae,
    train_on_cache,
    with_latent_stats,
)
from director_jax.demo.data import downscale, training_windows
from director_jax.io_utils import atomic_write_text
from director_jax.models.timeline import Timeline, TimelineLayout
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.models.vae_init import inflate_temporal_kernels, scale_conv_kernels
from director_jax.train.tasks import SRTask, degrade_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAE_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")


def vae_section(cfg: ml_collections.ConfigDict) -> dict:
    return {k: cfg.vae[k] for k in VAE_FIELDS}


def layouts(cfg: ml_collections.ConfigDict) -> list[TimelineLayout]:
    n = int(cfg.data.gen_frames)
    return [Timeline.from_keyframes(n, list(t["keyframes"]), [tuple(v) for v in t.get("videos", ())]).layout
            for t in cfg.layouts]


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
# Director-Gen and Director-SR configs


def _common(c: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, section: ml_collections.ConfigDict,
            workdir: Path) -> ml_collections.ConfigDict:
    c.seed = int(cfg.seed)
    c.vae.update(vae_section(cfg))
    c.model.update(dict(in_channels=int(cfg.vae.z_dim), out_channels=int(cfg.vae.z_dim)))  # the DiT over its latents
    c.vae.init_from = str((workdir / "vae").resolve())
    c.video.num_frames = int(cfg.data.gen_frames)
    c.video.fps = float(cfg.data.fps)
    c.train.update(dict(steps=int(section.steps), batch_size=int(section.batch_size), latents="precomputed",
                        timelines="per_example", log_every=50))
    c.optim.update(dict(learning_rate=float(section.learning_rate), warmup_steps=int(section.warmup_steps),
                        ema_decay=float(section.ema_decay)))
    c.checkpoint.update(dict(every=int(section.steps), keep_last=1, async_save=False))
    c.sampler.steps = int(section.sampler_steps)
    return c


def gen_config(cfg: ml_collections.ConfigDict, workdir: Path) -> ml_collections.ConfigDict:
    """``configs/gen_tiny.py`` at the demo's size, VAE and training budget."""
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


# ------------------------------------------------------------------------------------------------
# Training on latent caches


def gen_caches(cfg: ml_collections.ConfigDict, vae: WanVAE, samples: list[dict], *, progress: bool = True
               ) -> list[LayoutCache]:
    """Latent caches of Gen's training windows (32x32), one per layout of ``cfg.layouts``, in that order.

    Layouts without a ``cut`` share single-shot windows; a layout with ``cut=k`` gets windows of
    multi-shot samples whose cut is at frame k (a cut anywhere else in a window would teach Gen that
    shots change between keyframes, which no timeline asks for).
    """
    rng = np.random.default_rng(int(cfg.seed) + 11)
    count, frames, factor = int(cfg.data.gen_clips), int(cfg.data.gen_frames), int(cfg.data.sr_scale)
    groups: dict[int | None, list[int]] = {}
    for i, t in enumerate(cfg.layouts):
        groups.setdefault(t.get("cut"), []).append(i)
    all_layouts, out = layouts(cfg), {}
    for cut, members in groups.items():
        windows = training_windows(samples, count, frames, rng, multi_shot_fraction=0.0, cut_at=cut)
        caches = encode_layouts(vae, downscale(windows, factor), [all_layouts[i] for i in members], progress=progress)
        out.update(zip(members, caches, strict=True))
    return [out[i] for i in range(len(all_layouts))]


def train_gen(cfg: ml_collections.ConfigDict, vae: WanVAE, samples: list[dict], workdir: Path, *,
              progress: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """Director-Gen on 32x32 windows of the curated clips, over every layout of ``cfg.layouts``."""
    gcfg = gen_config(cfg, workdir)
    caches = gen_caches(cfg, vae, samples, progress=progress)
    out = workdir / "gen"
    shutil.rmtree(out, ignore_errors=True)  # a fresh model: no steps of an earlier run mixed in
    report = train_on_cache(gcfg, caches, out, progress=progress)
    write_config_file(out / "config.py", gcfg, "Director-Gen of the CPU demo")
    atomic_write_text(out / "train_log.json", json.dumps(report))
    return gcfg, report


def train_sr(cfg: ml_collections.ConfigDict, vae: WanVAE, samples: list[dict], workdir: Path, *,
             progress: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
    """Director-SR on 64x64 windows, degraded and upsampled by the SR task's own seeded data path."""
    scfg = sr_config(cfg, workdir)
    task = SRTask(scfg)
    rng = np.random.default_rng(int(cfg.seed) + 12)
    clips = training_windows(samples, int(cfg.data.sr_clips), int(cfg.data.gen_frames), rng)
    batch = degrade_batch({"video": clips, "index": np.arange(len(clips))}, degradation=task.degradation,
                          seed=int(scfg.seed), keyframe_dropout=0.0)  # the SR task's own seeded degradations
    chosen = [layouts(cfg)[i] for i in cfg.sr.layouts]
    caches = encode_layouts(vae, clips, chosen, lowres=batch["upsampled"], progress=progress)
    out = workdir / "sr"
    shutil.rmtree(out, ignore_errors=True)
    report = train_on_cache(scfg, caches, out, keyframe_dropout=float(cfg.sr.keyframe_dropout), progress=progress)
    write_config_file(out / "config.py", scfg, "Director-SR of the CPU demo")
    atomic_write_text(out / "train_log.json", json.dumps(report))
    return scfg, report


def reused_vae(workdir: Path) -> WanVAE:
    """The VAE a previous run wrote to ``workdir/vae`` (``--reuse vae``)."""
    return load_vae(workdir / "vae")


def reused(model_dir: Path) -> tuple[ml_collections.ConfigDict, dict]:
    """The config and training log a previous run wrote beside its checkpoint (``--reuse gen`` / ``sr``)."""
    log = json.loads((model_dir / "train_log.json").read_text())
    return load_config(model_dir / "config.py"), {**log, "note": "reused"}


def devices_note() -> str:
    return f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
