"""Director-Gen's task: flow matching on the generated frames of timelines, given frames held clean.

Two kinds of timeline (``train.timelines``):

* ``"fixed"``: every example is ``train.keyframes`` over ``video.num_frames`` frames (one layout, one
  shape: a keyframe-conditioned fine-tune, and the smoke tests');
* ``"per_example"``: every example has its own task and keyframes, drawn by the data source
  (``data.tasks``: keyframes anywhere, one to many, at shot starts, extension forward / backward /
  in between; ``data/task_sampling.py``). The host plans each row's chunks and latents
  (``data/row_timelines.py``), rows are padded to a latent bucket (``train.latent_buckets``) and
  the padding is masked out of attention and loss. This is what teaches pacing control.

Latents are encoded inside the step by the frozen VAE (``train.latents = "encode"``: the batch holds
pixels) or read from the batch (``"precomputed"``: normalized chunk latents, as a latent cache gives
them). With ``text.conditioning`` off the model is trained unconditionally (an empty caption).
``train.keyframe_dropout``: the probability that an example's keyframes are all generated instead
(``losses.drop_keyframes``), which keyframe guidance at sampling needs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from director_jax.build import build_director_gen, frozen_vae, random_frozen_vae, vae_config_with_checkpoint_stats
from director_jax.data.loader import text_metadata
from director_jax.data.row_timelines import RowTimelineShapes, max_chunks, plan_rows
from director_jax.models.multichunk import encode_slots
from director_jax.models.timeline import Timeline, TimelineLayout
from director_jax.models.vae import normalize_latents
from director_jax.pipeline.gen import timeline_latents
from director_jax.train.losses import drop_keyframes, gen_loss
from director_jax.train.task_base import LATENT_SOURCES, BatchField, Task, synthetic_clips, task_sampling

TIMELINES = ("fixed", "per_example")
FRAMES = ("batch", "frames", "height", "width", "channels")


class GenTask(Task):
    """Director-Gen (see the module docstring)."""

    name = "gen"

    def __init__(self, cfg: ml_collections.ConfigDict):
        super().__init__(cfg)
        t, v = cfg.train, cfg.video
        if t.latents not in LATENT_SOURCES:
            raise ValueError(f"train.latents={t.latents!r}; choose one of {LATENT_SOURCES}.")
        self.timelines = str(t.get("timelines", "fixed"))
        if self.timelines not in TIMELINES:
            raise ValueError(f"train.timelines={self.timelines!r}; choose one of {TIMELINES}.")
        self.per_example = self.timelines == "per_example"
        self.layout: TimelineLayout = Timeline.from_keyframes(int(v.num_frames), list(t.keyframes)).layout
        self.shapes: RowTimelineShapes | None = None
        if self.per_example:
            sampling = task_sampling(cfg)
            slots = int(t.get("max_chunks", 0)) or max_chunks(int(sampling.get("max_keyframes", 4)))
            self.shapes = RowTimelineShapes(int(v.num_frames), slots, tuple(t.get("latent_buckets", ())))
        self.vae_config = vae_config_with_checkpoint_stats(cfg.vae)  # the weights' own latent scale
        factor = self.vae_config.spatial_factor * int(cfg.model.patch_size[1])
        if v.height % factor or v.width % factor:
            raise ValueError(f"video {v.height}x{v.width} must be a multiple of {factor} (the VAE's "
                             f"{self.vae_config.spatial_factor}x times the patch).")
        self.keyframe_dropout = float(t.get("keyframe_dropout", 0.0))
        if not 0.0 <= self.keyframe_dropout <= 1.0:
            raise ValueError(f"train.keyframe_dropout is a probability; got {self.keyframe_dropout}.")

    # -- models ----------------------------------------------------------------------------

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

    # -- batches ---------------------------------------------------------------------------

    @property
    def buckets(self) -> tuple[int, ...]:
        """The latent lengths a batch can have (one compiled step each)."""
        return self.shapes.buckets if self.per_example else (self.layout.num_latents,)

    def _latent_shape(self, bucket: int | None = None) -> tuple[int, int, int, int]:
        v = self.cfg.video
        f = self.vae_config.spatial_factor
        length = self.buckets[-1] if bucket is None else int(bucket)
        return (length, v.height // f, v.width // f, self.vae_config.z_dim)

    def batch_fields(self, global_batch: int, bucket: int | None = None) -> dict[str, BatchField]:
        """The fields of a batch whose rows hold ``bucket`` latent frames (default: the largest bucket)."""
        v, model = self.cfg.video, self.cfg.model
        bucket = self.buckets[-1] if bucket is None else int(bucket)
        fields = {}
        if self.cfg.train.latents == "encode":
            fields["video"] = BatchField((global_batch, v.num_frames, v.height, v.width, 3), jnp.float32, FRAMES)
        else:
            fields["latents"] = BatchField((global_batch, *self._latent_shape(bucket)), jnp.float32, FRAMES)
        if self.cfg.text.conditioning:
            length = int(self.cfg.text.max_length)
            fields["text"] = BatchField((global_batch, length, model.text_dim), jnp.float32,
                                        ("batch", "text_length", None))
            fields["text_mask"] = BatchField((global_batch, length), jnp.bool_, ("batch", "text_length"))
        if self.per_example:
            rows = ("batch", None)
            fields["latent_given"] = BatchField((global_batch, bucket), jnp.bool_, rows)
            fields["latent_valid"] = BatchField((global_batch, bucket), jnp.bool_, rows)
            fields["latent_position"] = BatchField((global_batch, bucket), jnp.float32, rows)
            if self.cfg.train.latents == "encode":
                fields["latent_source"] = BatchField((global_batch, bucket), jnp.int32, rows)
                for i, p in enumerate(self.shapes.slot_frames):
                    fields[f"slot_frames_{i}"] = BatchField((global_batch, p), jnp.int32, rows)
        return fields

    def encode_latents(self, frozen: nnx.Module, batch: dict[str, jax.Array], pixels: str) -> jax.Array:
        """Normalized latents of ``batch[pixels]`` over each row's timeline (frozen VAE, no gradient)."""
        video = batch[pixels]
        if self.per_example:
            slots = [batch[f"slot_frames_{i}"] for i in range(len(self.shapes.slot_frames))]
            mean = encode_slots(frozen, video, slots, batch["latent_source"])
            return jax.lax.stop_gradient(normalize_latents(mean, frozen.config))
        return jax.lax.stop_gradient(timeline_latents(frozen, video, self.layout))

    def batch_layout(self, batch: dict[str, jax.Array], b: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(given (B, L), positions (L,) or (B, L), valid (B, L) or None): the rows' own timelines, or the fixed one."""
        if self.per_example:
            return (jnp.asarray(batch["latent_given"], bool), jnp.asarray(batch["latent_position"], jnp.float32),
                    jnp.asarray(batch["latent_valid"], bool))
        given = jnp.broadcast_to(jnp.asarray(self.layout.given), (b, self.layout.num_latents))
        return given, jnp.asarray(self.layout.position), None

    def batch_text(self, batch: dict[str, jax.Array], b: int) -> tuple[jax.Array, jax.Array]:
        """(text, mask) of the batch; unconditional training gets one masked-out text token per row."""
        if "text" in batch:
            return batch["text"], batch["text_mask"]
        return jnp.zeros((b, 1, self.cfg.model.text_dim), jnp.float32), jnp.zeros((b, 1), bool)

    def flow_options(self) -> dict:
        f = self.cfg.flow
        return dict(timestep_sampling=f.timestep_sampling, logit_mean=float(f.logit_mean),
                    logit_std=float(f.logit_std), shift=float(f.shift))

    def loss(self, model, frozen, batch, key):
        latents = batch["latents"] if "latents" in batch else self.encode_latents(frozen, batch, "video")
        b = latents.shape[0]
        text, text_mask = self.batch_text(batch, b)
        given, positions, valid = self.batch_layout(batch, b)
        given = drop_keyframes(given, key, self.keyframe_dropout)
        loss, aux = gen_loss(model, latents, given, positions, text, key, text_mask=text_mask, valid=valid,
                             **self.flow_options())
        return loss, {**aux, **self.padding_metrics(valid)}

    @staticmethod
    def padding_metrics(valid: jax.Array | None) -> dict[str, jax.Array]:
        """The share of the batch's latent frames that are bucket padding (per-example timelines)."""
        if valid is None:
            return {}
        return {"padding_fraction": 1.0 - jnp.mean(valid.astype(jnp.float32))}

    def data_transform(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None:
        if not self.per_example:
            return None
        return functools.partial(plan_batch, shapes=self.shapes, slots=self.cfg.train.latents == "encode")

    # -- sizes -----------------------------------------------------------------------------

    def tokens_per_example(self, bucket: int | None = None) -> int:
        """Tokens of one row at ``bucket`` latent frames (default: the largest bucket), padded tokens included."""
        length, h, w, _ = self._latent_shape(bucket)
        _, ph, pw = self.cfg.model.patch_size
        return length * (h // ph) * (w // pw)

    def train_flops_per_example(self, bucket: int | None = None) -> float:
        """3x the DiT forward of a row at ``bucket`` latent frames (default: the largest): per block
        12 D^2 + 4 D F per token (self/cross projections, FFN), 4 S^2 D (self-attention scores and
        values), 4 S T D + 4 T D^2 (cross-attention over T text tokens), plus patch embedding and head.
        The frozen VAE encode is not counted (not trained)."""
        m = self.cfg.model
        d, ffn, layers = m.num_attention_heads * m.attention_head_dim, m.ffn_dim, m.num_layers
        s = self.tokens_per_example(bucket)
        t = int(self.cfg.text.max_length) if self.cfg.text.conditioning else 1
        patch = math.prod(m.patch_size) * m.in_channels
        per_block = s * (12 * d * d + 4 * d * ffn) + 4 * s * s * d + 4 * s * t * d + 4 * t * d * d
        forward = layers * per_block + 2 * s * patch * d * 2 + 2 * t * m.text_dim * d
        return 3.0 * forward

    def describe(self) -> str:
        v = self.cfg.video
        if self.per_example:
            what = f"per-example timelines, latent buckets {self.buckets}"
        else:
            what = f"keyframes {tuple(self.cfg.train.keyframes)}, {self.layout.num_latents} latent frames"
        return f"{v.num_frames} frames {v.height}x{v.width}, {what}, {self.tokens_per_example()} tokens"

    # -- data sources ----------------------------------------------------------------------

    def clips_config(self):
        v = self.cfg.video
        if self.cfg.train.latents != "encode":
            raise ValueError("train.latents='precomputed' needs a latent cache; the synthetic source gives pixels: "
                             "set --config.train.latents=encode.")
        if self.cfg.text.conditioning:
            raise ValueError("the synthetic source has no caption embeddings: set --config.text.conditioning=False "
                             "(unconditional) or train on curated shards (--config.data.source=curated "
                             "--config.data.curated.dir=DIR, built with text embeddings).")
        extra = dict(tasks=True, **task_sampling(self.cfg)) if self.per_example else {}
        return synthetic_clips(self.cfg, v.num_frames, v.height, v.width, **extra)

    def curated_config(self):
        """As the base, after checking what curated clips can feed: pixels, and caption embeddings that fit."""
        if self.cfg.train.latents != "encode":
            raise ValueError("data.source='curated' gives pixels: set --config.train.latents=encode (the frozen VAE "
                             "encodes them in the step).")
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


def plan_batch(batch: dict[str, np.ndarray], *, shapes: RowTimelineShapes, slots: bool) -> dict[str, np.ndarray]:
    """A host batch with its rows' timeline arrays added (``row_timelines.plan_rows``), at the largest bucket.

    Rows need ``given`` / ``given_start`` (the data source's task draw); ``keyframes_kept`` (SR's
    keyframe dropout, drawn in its degradation transform) clears a row's given latents.
    """
    missing = {"given", "given_start"} - set(batch)
    if missing:
        raise KeyError(f"per-example timelines need the data source's task draw ({sorted(missing)} missing): use "
                       "data.source='curated', or the synthetic source with train.timelines='per_example'.")
    plan = plan_rows(batch["given"], batch["given_start"], shapes, slots=slots,
                     keyframes_kept=batch.get("keyframes_kept"))
    return {**batch, **plan}
