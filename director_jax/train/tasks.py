"""What the one trainer trains, chosen by ``config.task``: the VAE, Director-Gen or Director-SR.

A task says how to build the trainable model (and any frozen one, such as the VAE that encodes
Director-Gen's pixels inside the step), what a global batch looks like (shapes, dtypes, logical
sharding names), the loss of one micro-batch, how many tokens a batch holds (for tokens/s and the
progress bar), where its examples come from and what the host does to each batch before the step
(``data_transform``: Director-SR degrades its clips there).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from director_jax.build import (
    build_director_gen,
    build_director_sr,
    build_vae,
    frozen_vae,
    random_frozen_vae,
    vae_config_from,
    vae_config_with_checkpoint_stats,
)
from director_jax.data.degradations import DegradationConfig, degrade_float
from director_jax.data.loader import CuratedLoaderConfig, text_metadata
from director_jax.data.synthetic_loader import SyntheticClipsConfig
from director_jax.models.lpips import LPIPS
from director_jax.models.timeline import TEMPORAL_FACTOR, Timeline, TimelineLayout
from director_jax.pipeline.gen import timeline_latents
from director_jax.train.latent_stats import with_posterior_moments
from director_jax.train.losses import drop_keyframes, gen_loss, sr_loss, vae_loss

log = logging.getLogger(__name__)


LATENT_SOURCES = ("encode", "precomputed")


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One array of a global batch: its shape (batch first), dtype and logical axis names."""

    shape: tuple[int, ...]
    dtype: Any
    logical: tuple[str | None, ...]


def _synthetic_clips(cfg: ml_collections.ConfigDict, clip_frames: int, height: int, width: int):
    s = cfg.data.synthetic
    return SyntheticClipsConfig(num_movies=int(s.num_movies), height=height, width=width, fps=float(s.fps),
                                clip_frames=clip_frames, shot_lengths=tuple(s.shot_lengths),
                                shots_per_movie=int(s.shots_per_movie), hflip=bool(s.hflip), seed=int(cfg.seed))


class Task:
    """Base: subclasses fill in the model, the batch fields and the loss."""

    name: str = ""
    latent_channels: int | None = None  # the VAE task's: keep running latent statistics (train/latent_stats.py)

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

    def curated_config(self):
        """The curated-shard loader's settings (``data.source='curated'``): windows of the config's video size.

        Caption embeddings are padded to ``text.max_length`` when the task is text-conditioned.
        """
        v, c = self.cfg.video, self.cfg.data.curated
        text = self.cfg.get("text")
        conditioned = text is not None and bool(text.get("conditioning", False))
        return CuratedLoaderConfig(
            data_dir=str(c.dir), split=str(c.split), clip_frames=int(v.num_frames), fps=float(c.fps) or None,
            buckets=((int(v.height), int(v.width)),), caption_dropout=float(c.caption_dropout),
            text_length=int(text.max_length) if conditioned else None, decode_threads=int(c.decode_threads),
            seed=int(self.cfg.seed))

    def data_transform(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
        """A picklable function the data pipeline applies to every host batch (numpy in, numpy out); None: none."""
        return None


class VaeTask(Task):
    """The causal VAE: reconstruction (L1 + KL) of random clips."""

    name = "vae"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        self.vae_config = vae_config_from(cfg.vae)
        self.latent_channels = self.vae_config.z_dim
        v = cfg.video
        if (v.num_frames - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"config.video.num_frames={v.num_frames}: VAE training clips need 4n+1 frames.")
        # Built once here (weights loaded, distance jitted); the loss closes over it. None when unused.
        self.lpips = LPIPS("alexnet") if float(cfg.train.get("lpips_weight", 0.0)) > 0 else None

    def build_fn(self) -> Callable[[], nnx.Module]:
        cfg = self.cfg
        return lambda: build_vae(cfg)

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        v = self.cfg.video
        return {"video": BatchField((global_batch, v.num_frames, v.height, v.width, 3), jnp.float32,
                                    ("batch", "frames", "height", "width", "channels"))}

    def loss(self, model, frozen, batch, key):
        t = self.cfg.train
        return with_posterior_moments(vae_loss, model, batch["video"], key, float(t.kl_weight),
                                      bool(t.sample_posterior), lpips_weight=float(t.get("lpips_weight", 0.0)),
                                      lpips=self.lpips, mse_weight=float(t.get("mse_weight", 0.0)),
                                      anchor_weight=float(t.get("anchor_weight", 0.0)))

    def tokens_per_example(self) -> int:
        v = self.cfg.video
        f = self.vae_config.spatial_factor
        return ((v.num_frames - 1) // TEMPORAL_FACTOR + 1) * (v.height // f) * (v.width // f)

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
    ``train.keyframe_dropout``: the probability that an example's keyframes are all generated
    instead (``losses.drop_keyframes``), which keyframe guidance at sampling needs.
    """

    name = "gen"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        t, v = cfg.train, cfg.video
        if t.latents not in LATENT_SOURCES:
            raise ValueError(f"train.latents={t.latents!r}; choose one of {LATENT_SOURCES}.")
        self.layout: TimelineLayout = Timeline.from_keyframes(int(v.num_frames), list(t.keyframes)).layout
        self.vae_config = vae_config_with_checkpoint_stats(cfg.vae)  # the weights' own latent scale
        factor = self.vae_config.spatial_factor * int(cfg.model.patch_size[1])
        if v.height % factor or v.width % factor:
            raise ValueError(f"video {v.height}x{v.width} must be a multiple of {factor} (the VAE's "
                             f"{self.vae_config.spatial_factor}x times the patch).")
        self.layouts_in_batch = bool(t.get("layouts_in_batch", False))
        self.keyframe_dropout = float(t.get("keyframe_dropout", 0.0))
        if not 0.0 <= self.keyframe_dropout <= 1.0:
            raise ValueError(f"train.keyframe_dropout is a probability; got {self.keyframe_dropout}.")

    def build_fn(self) -> Callable[[], nnx.Module]:
        cfg = self.cfg
        return lambda: build_director_gen(cfg)

    def frozen_build_fn(self) -> Callable[[], nnx.Module] | None:
        if self.cfg.train.latents != "encode":
            return None
        cfg = self.cfg
        return lambda: random_frozen_vae(cfg)

    def frozen_model(self) -> nnx.Module | None:
        return frozen_vae(self.cfg) if self.cfg.train.latents == "encode" else None

    def _latent_shape(self) -> tuple[int, int, int, int]:
        v = self.cfg.video
        f = self.vae_config.spatial_factor
        return (self.layout.num_latents, v.height // f, v.width // f, self.vae_config.z_dim)

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
        if self.layouts_in_batch:
            fields.update(self._layout_fields(global_batch))
        return fields

    def _layout_fields(self, global_batch: int) -> dict[str, BatchField]:
        """Per-example timelines (``train.layouts_in_batch``): the given mask and MC-RoPE positions of each row.

        The shapes here are those of ``train.keyframes``' layout; a batch of another latent count L (one
        layout family per batch, e.g. a latent cache grouped by layout) traces the step once more.
        """
        length = self.layout.num_latents
        return {"given": BatchField((global_batch, length), jnp.bool_, ("batch", None)),
                "position": BatchField((global_batch, length), jnp.float32, ("batch", None))}

    def batch_layout(self, batch: dict[str, jax.Array], b: int) -> tuple[jax.Array, jax.Array]:
        """(given (B, L), positions (L,) or (B, L)): the batch's own timelines, else ``train.keyframes``' layout."""
        if self.layouts_in_batch:
            return jnp.asarray(batch["given"], bool), jnp.asarray(batch["position"], jnp.float32)
        given = jnp.broadcast_to(jnp.asarray(self.layout.given), (b, self.layout.num_latents))
        return given, jnp.asarray(self.layout.position)

    def batch_text(self, batch: dict[str, jax.Array], b: int) -> tuple[jax.Array, jax.Array]:
        """(text, mask) of the batch; unconditional training gets one masked-out text token per row."""
        if "text" in batch:
            return batch["text"], batch["text_mask"]
        return jnp.zeros((b, 1, self.cfg.model.text_dim), jnp.float32), jnp.zeros((b, 1), bool)

    def loss(self, model, frozen, batch, key):
        if "latents" in batch:
            latents = batch["latents"]
        else:
            latents = jax.lax.stop_gradient(timeline_latents(frozen, batch["video"], self.layout))
        b = latents.shape[0]
        text, text_mask = self.batch_text(batch, b)
        given, positions = self.batch_layout(batch, b)
        given = drop_keyframes(given, key, self.keyframe_dropout)
        f = self.cfg.flow
        return gen_loss(model, latents, given, positions, text, key, text_mask=text_mask,
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
            raise ValueError("the synthetic source has no caption embeddings: set --config.text.conditioning=False "
                             "(unconditional) or train on curated shards (--config.data.source=curated "
                             "--config.data.curated.dir=DIR, built with text embeddings).")
        return _synthetic_clips(self.cfg, v.num_frames, v.height, v.width)

    def curated_config(self):
        """As the base, after checking what curated clips can feed: pixels for ``train.keyframes``' timeline.

        Every example is trained on that one timeline; the loader's own per-example task and keyframe draw
        (its ``given`` masks) would need a timeline per row, which the encode-in-step path does not have.
        """
        t = self.cfg.train
        if t.latents != "encode":
            raise ValueError("data.source='curated' gives pixels: set --config.train.latents=encode (the frozen VAE "
                             "encodes them in the step).")
        if self.layouts_in_batch:
            raise ValueError("train.layouts_in_batch reads per-row timelines from a latent cache; curated clips are "
                             "trained on train.keyframes' timeline: set --config.train.layouts_in_batch=False.")
        loader = super().curated_config()
        if self.cfg.text.conditioning:
            meta = text_metadata(loader)
            if meta is None:
                raise ValueError(f"{loader.data_dir} was built without caption embeddings but text.conditioning is "
                                 "on: rebuild it with --text_cache, or set --config.text.conditioning=False.")
            if int(meta["dim"]) != int(self.cfg.model.text_dim):
                raise ValueError(f"{loader.data_dir}'s caption embeddings have {meta['dim']} channels; the model's "
                                 f"text_dim is {self.cfg.model.text_dim}: they come from another text encoder.")
        return loader


_KEYFRAME_DROP_SALT = 0x4B46  # keeps the keyframe-dropout draw apart from the degradation's and the clip's


def keyframes_kept(seed: int, index: int, keyframe_dropout: float) -> bool:
    """Whether example ``index`` keeps its keyframes (a pure function of the run seed and the index)."""
    u = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), _KEYFRAME_DROP_SALT])).random()
    return bool(u >= keyframe_dropout)


def degrade_batch(batch: dict[str, np.ndarray], *, degradation: DegradationConfig, seed: int, given: np.ndarray,
                  keyframe_dropout: float) -> dict[str, np.ndarray]:
    """Adds Director-SR's inputs to a batch of high-res clips, each row seeded by ``(seed, its index)``.

    ``lowres`` (b, T, H/s, W/s, 3) is ``degrade_float(clip, degradation, (seed, index)).lowres`` and
    ``upsampled`` (b, T, H, W, 3) its bicubic upsampling back (float32 in [-1, 1]); ``given`` (b, L)
    is the layout's clean-frame mask, all False for an example whose keyframes are dropped (so the
    model also learns to upsample without anchors, as ``super_resolve(keyframes=None)`` asks).
    Pure in the batch: a resumed run or another host makes the same pairs.
    """
    lowres, upsampled, kept = [], [], []
    for clip, index in zip(batch["video"], batch["index"], strict=True):
        out = degrade_float(clip, degradation, (int(seed), int(index)))
        lowres.append(out.lowres)
        upsampled.append(out.upsampled)
        kept.append(keyframes_kept(seed, int(index), keyframe_dropout))
    given = np.asarray(given, bool)[None] & np.asarray(kept, bool)[:, None]
    return {**batch, "lowres": np.stack(lowres), "upsampled": np.stack(upsampled), "given": given}


class SRTask(GenTask):
    """Director-SR: flow matching on the generated frames, conditioned on the degraded clip's latents.

    Examples are high-res synthetic clips; the data path (``data_transform``) degrades each one
    (``config.degradation``: DegradationConfig fields, one scale) and upsamples it back, seeded by
    ``(seed, example index)``. In the step the frozen VAE encodes the high-res clip and the
    upsampled one over the same timeline layout (keyframes ``train.keyframes`` at chunk starts), so
    both lie on one latent grid; the high-res keyframe latents stay clean (sigma 0) and out of the
    loss, exactly as for Director-Gen, except in examples whose keyframes are dropped
    (``train.keyframe_dropout``), where every frame is generated. ``train.latents="precomputed"``
    takes both latents from the batch instead (a latent cache). ``config.model`` is the Gen
    architecture; ``init_from`` a Gen or SR checkpoint (``build_director_sr``). The frozen VAE is
    ``vae.init_from`` (a diffusers directory or a VAE run), whose own latent statistics normalise the latents.
    """

    name = "sr"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        self.degradation = DegradationConfig.from_config(cfg.degradation)
        if len(self.degradation.scales) != 1:
            raise ValueError(f"degradation.scales={self.degradation.scales}: an SR model upsamples by one factor; "
                             "set one, e.g. --config.degradation.scales='(4,)'.")
        self.scale = self.degradation.scales[0]
        v = cfg.video
        if v.height % self.scale or v.width % self.scale:
            raise ValueError(f"video {v.height}x{v.width} is not divisible by the scale {self.scale}.")
        if int(cfg.model.in_channels) != self.vae_config.z_dim:
            raise ValueError(f"config.model.in_channels={cfg.model.in_channels} but the VAE has z_dim "
                             f"{self.vae_config.z_dim}: config.model is the Gen architecture over the VAE's latents.")

    def build_fn(self) -> Callable[[], nnx.Module]:
        cfg = self.cfg
        return lambda: build_director_sr(cfg)

    def batch_fields(self, global_batch: int) -> dict[str, BatchField]:
        fields = super().batch_fields(global_batch)
        frames = ("batch", "frames", "height", "width", "channels")
        if self.cfg.train.latents == "encode":
            fields["upsampled"] = BatchField(fields["video"].shape, jnp.float32, frames)
        else:
            fields["lowres_latents"] = BatchField(fields["latents"].shape, jnp.float32, frames)
        if not self.layouts_in_batch:  # per-example keyframe dropout: the given mask is always a batch field
            fields["given"] = BatchField((global_batch, self.layout.num_latents), jnp.bool_, ("batch", None))
        return fields

    def loss(self, model, frozen, batch, key):
        if "latents" in batch:
            latents, lowres = batch["latents"], batch["lowres_latents"]
        else:
            latents = jax.lax.stop_gradient(timeline_latents(frozen, batch["video"], self.layout))
            lowres = jax.lax.stop_gradient(timeline_latents(frozen, batch["upsampled"], self.layout))
        b = latents.shape[0]
        text, text_mask = self.batch_text(batch, b)
        if self.layouts_in_batch:
            given, positions = self.batch_layout(batch, b)
        else:
            given = jnp.asarray(batch["given"], bool) & jnp.asarray(self.layout.given)[None]
            positions = jnp.asarray(self.layout.position)
        f = self.cfg.flow
        return sr_loss(model, latents, lowres, given, positions, text, key,
                       text_mask=text_mask, timestep_sampling=f.timestep_sampling, logit_mean=float(f.logit_mean),
                       logit_std=float(f.logit_std), shift=float(f.shift))

    def train_flops_per_example(self) -> float:
        """Gen's count plus the patch embedding's extra z low-res input channels."""
        m = self.cfg.model
        d = m.num_attention_heads * m.attention_head_dim
        extra = 2 * self.tokens_per_example() * math.prod(m.patch_size) * m.in_channels * d
        return super().train_flops_per_example() + 3.0 * extra

    def describe(self) -> str:
        return (f"{super().describe()}, {self.scale}x SR from "
                f"{self.cfg.video.height // self.scale}x{self.cfg.video.width // self.scale}, "
                f"keyframe dropout {self.keyframe_dropout:g}")

    def data_transform(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        return functools.partial(degrade_batch, degradation=self.degradation, seed=int(self.cfg.seed),
                                 given=np.asarray(self.layout.given), keyframe_dropout=self.keyframe_dropout)


TASKS: dict[str, type[Task]] = {"vae": VaeTask, "gen": GenTask, "sr": SRTask}


def make_task(cfg: ml_collections.ConfigDict) -> Task:
    """The task named by ``config.task``."""
    if cfg.task not in TASKS:
        raise ValueError(f"config.task={cfg.task!r} is not a task; choose one of {sorted(TASKS)}.")
    return TASKS[cfg.task](cfg)

