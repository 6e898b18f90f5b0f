"""What the one trainer trains, chosen by ``config.task``: the VAE or Director-Gen (Director-SR joins here).

A task says how to build the trainable model (and any frozen one, such as the VAE that encodes
Director-Gen's pixels inside the step), what a global batch looks like (shapes, dtypes, logical
sharding names), the loss of one micro-batch, how many tokens a batch holds (for tokens/s and the
progress bar) and where its examples come from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from director_jax.configs_common import build_director_gen
from director_jax.eval.lpips import LPIPS
from director_jax.models.timeline import Timeline, TimelineLayout
from director_jax.models.vae import TEMPORAL_FACTOR, WanVAE, WanVAEConfig
from director_jax.pipeline.gen import timeline_latents
from director_jax.train.losses import gen_loss, vae_loss

log = logging.getLogger(__name__)

SPATIAL_FACTOR = 8  # pixels per latent, each side (Wan2.1 VAE)

LATENT_SOURCES = ("encode", "precomputed")


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a global batch: its shape (batch first), dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    logical: tuple[str | None, ...]


def vae_config_from(section: ml_collections.ConfigDict) -> WanVAEConfig:
    """``config.vae`` (WanVAEConfig fields, plus ``init_from``) as a WanVAEConfig."""
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    values = {k: v for k, v in section.to_dict().items() if k != "init_from"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.vae has unknown keys {unknown}; WanVAEConfig fields are {sorted(fields)}.")
    return WanVAEConfig(**values)


def _synthetic_clips(cfg: ml_collections.ConfigDict, clip_frames: int, height: int, width: int):
    from director_jax.data.synthetic_loader import SyntheticClipsConfig

    s = cfg.data.synthetic
    return SyntheticClipsConfig(num_movies=int(s.num_movies), height=height, width=width, fps=float(s.fps),
                                clip_frames=clip_frames, shot_lengths=tuple(s.shot_lengths),
                                shots_per_movie=int(s.shots_per_movie), hflip=bool(s.hflip), seed=int(cfg.seed))


class Task:
    """Base: subclasses fill in the model, the batch fields and the loss."""

    name: str = ""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg

    def build_fn(self) -> Callable[[], nnx.Module]:
        """A function making the trainable model with its own RNGs (traceable: used under eval_shape / jit)."""
        raise NotImplementedError

    def frozen_build_fn(self) -> Callable[[], nnx.Module] | None:
        """How to build (randomly initialised) the model the step uses but does not train; None if none."""
        return None

    def frozen_model(self) -> nnx.Module | None:
        """That frozen model with its real weights."""
        build = self.frozen_build_fn()
        return None if build is None else build()

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        raise NotImplementedError

    def loss(self, model: nnx.Module, frozen: nnx.Module | None, batch: dict[str, jax.Array], key: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def tokens_per_example(self) -> int:
        raise NotImplementedError

    def train_flops_per_example(self) -> float | None:
        """Analytic training FLOPs of one example (3x forward), or None to use XLA's count."""
        return None

    def describe(self) -> str:
        """One line for logs: what one example is."""
        return f"{self.tokens_per_example()} tokens per example"

    def clips_config(self):
        """The synthetic-clip source settings for this task's examples."""
        raise NotImplementedError


class VaeTask(Task):
    """The causal VAE: reconstruction (L1 + KL) of random clips."""

    name = "vae"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        self.vae_config = vae_config_from(cfg.vae)
        v = cfg.video
        if (v.num_frames - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"config.video.num_frames={v.num_frames}: VAE training clips need 4n+1 frames.")
        # Built once here (weights loaded, distance jitted); the loss closes over it. None when unused.
        self.lpips = LPIPS("alexnet") if float(cfg.train.get("lpips_weight", 0.0)) > 0 else None

    def build_fn(self) -> Callable[[], nnx.Module]:
        config, seed = self.vae_config, int(self.cfg.seed)
        dtype = jnp.dtype(self.cfg.model_options.dtype)
        param_dtype = jnp.dtype(self.cfg.model_options.param_dtype)
        return lambda: WanVAE(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        v = self.cfg.video
        return {"video": BatchField((global_batch, v.num_frames, v.height, v.width, 3), jnp.float32,
                                    ("batch", "frames", "height", "width", "channels"))}

    def loss(self, model, frozen, batch, key):
        t = self.cfg.train
        return vae_loss(model, batch["video"], key, float(t.kl_weight), bool(t.sample_posterior),
                        lpips_weight=float(t.get("lpips_weight", 0.0)), lpips=self.lpips)

    def tokens_per_example(self) -> int:
        v = self.cfg.video
        return ((v.num_frames - 1) // TEMPORAL_FACTOR + 1) * (v.height // SPATIAL_FACTOR) * (v.width // SPATIAL_FACTOR)

    def clips_config(self):
        v = self.cfg.video
        return _synthetic_clips(self.cfg, v.num_frames, v.height, v.width)


class GenTask(Task):
    """Director-Gen: flow matching on the generated frames of a timeline, keyframes held clean.

    The timeline of a training example is ``train.keyframes`` (frame indices) over
    ``video.num_frames`` frames. Latents are either encoded inside the step by the frozen VAE
    (``train.latents = "encode"``: the batch holds pixels) or precomputed (``"precomputed"``: the
    batch holds normalized chunk latents in the layout's order, as a latent cache provides them).
    With ``text.conditioning`` off the model is trained unconditionally (an empty caption).
    """

    name = "gen"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        t, v = cfg.train, cfg.video
        if t.latents not in LATENT_SOURCES:
            raise ValueError(f"train.latents={t.latents!r}; choose one of {LATENT_SOURCES}.")
        self.layout: TimelineLayout = Timeline.from_keyframes(int(v.num_frames), list(t.keyframes)).layout
        self.vae_config = vae_config_from(cfg.vae)
        if v.height % (SPATIAL_FACTOR * 2) or v.width % (SPATIAL_FACTOR * 2):
            raise ValueError(f"video {v.height}x{v.width} must be a multiple of 16 (VAE 8x times the 2x2 patch).")

    def build_fn(self) -> Callable[[], nnx.Module]:
        cfg = self.cfg
        return lambda: build_director_gen(cfg)

    def frozen_build_fn(self) -> Callable[[], nnx.Module] | None:
        if self.cfg.train.latents != "encode":
            return None
        config, seed = self.vae_config, int(self.cfg.seed) + 1
        return lambda: WanVAE(config, rngs=nnx.Rngs(seed))

    def frozen_model(self) -> nnx.Module | None:
        if self.cfg.train.latents != "encode":
            return None
        if self.cfg.vae.init_from:
            from director_jax.convert.vae import load_vae

            return load_vae(self.cfg.vae.init_from, self.vae_config)
        log.warning("config.vae.init_from is empty: Director-Gen trains on latents of a randomly initialised "
                    "VAE (fine for tests; set --config.vae.init_from to a Wan2.1 VAE for real runs).")
        return self.frozen_build_fn()()

    def _latent_shape(self) -> tuple[int, int, int, int]:
        v = self.cfg.video
        return (self.layout.num_latents, v.height // SPATIAL_FACTOR, v.width // SPATIAL_FACTOR,
                self.vae_config.z_dim)

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        v, model = self.cfg.video, self.cfg.model
        fields = {}
        if self.cfg.train.latents == "encode":
            fields["video"] = BatchField((global_batch, v.num_frames, v.height, v.width, 3), jnp.float32,
                                         ("batch", "frames", "height", "width", "channels"))
        else:
            fields["latents"] = BatchField((global_batch, *self._latent_shape()), jnp.float32,
                                           ("batch", "frames", "height", "width", "channels"))
        if self.cfg.text.conditioning:
            length = int(self.cfg.text.max_length)
            fields["text"] = BatchField((global_batch, length, model.text_dim), jnp.float32,
                                        ("batch", "text_length", None))
            fields["text_mask"] = BatchField((global_batch, length), jnp.bool_, ("batch", "text_length"))
        return fields

    def loss(self, model, frozen, batch, key):
        if "latents" in batch:
            latents = batch["latents"]
        else:
            latents = jax.lax.stop_gradient(timeline_latents(frozen, batch["video"], self.layout))
        b = latents.shape[0]
        if "text" in batch:
            text, text_mask = batch["text"], batch["text_mask"]
        else:  # unconditional: one masked-out text token
            text = jnp.zeros((b, 1, self.cfg.model.text_dim), jnp.float32)
            text_mask = jnp.zeros((b, 1), bool)
        given = jnp.broadcast_to(jnp.asarray(self.layout.given), (b, self.layout.num_latents))
        f = self.cfg.flow
        return gen_loss(model, latents, given, jnp.asarray(self.layout.position), text, key, text_mask=text_mask,
                        timestep_sampling=f.timestep_sampling, logit_mean=float(f.logit_mean),
                        logit_std=float(f.logit_std), shift=float(f.shift))

    def tokens_per_example(self) -> int:
        length, h, w, _ = self._latent_shape()
        _, ph, pw = self.cfg.model.patch_size
        return length * (h // ph) * (w // pw)

    def train_flops_per_example(self) -> float:
        """3x the DiT forward: per block 12 D^2 + 4 D F per token (self/cross projections, FFN),
        4 S^2 D (self-attention scores and values), 4 S T D + 4 T D^2 (cross-attention over T text
        tokens), plus patch embedding and head. The frozen VAE encode is not counted (not trained)."""
        m = self.cfg.model
        d, ffn, layers = m.num_attention_heads * m.attention_head_dim, m.ffn_dim, m.num_layers
        s = self.tokens_per_example()
        t = int(self.cfg.text.max_length) if self.cfg.text.conditioning else 1
        patch = math.prod(m.patch_size) * m.in_channels
        per_block = s * (12 * d * d + 4 * d * ffn) + 4 * s * s * d + 4 * s * t * d + 4 * t * d * d
        forward = layers * per_block + 2 * s * patch * d * 2 + 2 * t * m.text_dim * d
        return 3.0 * forward

    def describe(self) -> str:
        v = self.cfg.video
        return (f"{v.num_frames} frames {v.height}x{v.width}, keyframes {tuple(self.cfg.train.keyframes)}, "
                f"{self.layout.num_latents} latent frames, {self.tokens_per_example()} tokens")

    def clips_config(self):
        v = self.cfg.video
        if self.cfg.train.latents != "encode":
            raise ValueError("train.latents='precomputed' needs a latent cache; the synthetic source gives pixels: "
                             "set --config.train.latents=encode.")
        if self.cfg.text.conditioning:
            raise ValueError("the synthetic source has no caption embeddings yet: set "
                             "--config.text.conditioning=False (unconditional) or use a curated-shard source.")
        return _synthetic_clips(self.cfg, v.num_frames, v.height, v.width)


TASKS: dict[str, type[Task]] = {"vae": VaeTask, "gen": GenTask}


def make_task(cfg: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.task``."""
    if cfg.task not in TASKS:
        raise ValueError(f"config.task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}.")
    return TASKS[cfg.task](cfg)

