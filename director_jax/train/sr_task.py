"""Director-SR's task: flow matching on the generated frames, conditioned on the degraded clip's latents.

Examples are high-res clips; the data path (``data_transform``) degrades each one
(``config.degradation``: DegradationConfig fields, one scale) and upsamples it back, seeded by
``(seed, example index)``. In the step the frozen VAE encodes the high-res clip and the upsampled
one over the same timeline (the fixed ``train.keyframes`` one or each row's own, as for
Director-Gen, ``gen_task.py``), so both lie on one latent grid; the high-res given latents stay
clean (sigma 0) and out of the loss, except in examples whose keyframes are dropped
(``train.keyframe_dropout``, drawn per example on the host), where every frame is generated.
``train.latents="precomputed"`` takes both latents from the batch instead (a latent cache written
by ``python -m director_jax.encode`` with an SR config: the same degradations, seeded alike).
``config.model`` is the Gen architecture; ``init_from`` a Gen or SR checkpoint
(``build_director_sr``). The frozen VAE is ``vae.init_from``, whose own latent statistics
normalise the latents.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from director_jax.build import build_director_sr
from director_jax.data.degradations import DegradationConfig, degrade_float
from director_jax.train.gen_task import FRAMES, GenTask, plan_batch
from director_jax.train.losses import sr_loss
from director_jax.train.task_base import BatchField

_KEYFRAME_DROP_SALT = 0x4B46  # keeps the keyframe-dropout draw apart from the degradation's and the clip's


def keyframes_kept(seed: int, index: int, keyframe_dropout: float) -> bool:
    """Whether example ``index`` keeps its keyframes (a pure function of the run seed and the index)."""
    u = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), _KEYFRAME_DROP_SALT])).random()
    return bool(u >= keyframe_dropout)


def degrade_batch(batch: dict[str, np.ndarray], *, degradation: DegradationConfig, seed: int,
                  keyframe_dropout: float) -> dict[str, np.ndarray]:
    """Adds Director-SR's inputs to a batch of high-res clips, each row seeded by ``(seed, its index)``.

    ``lowres`` (b, T, H/s, W/s, 3) is ``degrade_float(clip, degradation, (seed, index)).lowres`` and
    ``upsampled`` (b, T, H, W, 3) its bicubic upsampling back (float32 in [-1, 1]); ``keyframes_kept``
    (b,) bool is False for an example whose keyframes are dropped (so the model also learns to
    upsample without anchors, as ``super_resolve(keyframes=None)`` asks). Pure in the batch: a
    resumed run or another host makes the same pairs.
    """
    lowres, upsampled = [], []
    for clip, index in zip(batch["video"], batch["index"], strict=True):
        out = degrade_float(clip, degradation, (int(seed), int(index)))
        lowres.append(out.lowres)
        upsampled.append(out.upsampled)
    return keyframe_draw({**batch, "lowres": np.stack(lowres), "upsampled": np.stack(upsampled)}, seed=seed,
                         keyframe_dropout=keyframe_dropout)


def keyframe_draw(batch: dict[str, np.ndarray], *, seed: int, keyframe_dropout: float) -> dict[str, np.ndarray]:
    """``degrade_batch``'s ``keyframes_kept`` alone, for rows whose degraded latents come from a latent cache."""
    kept = [keyframes_kept(seed, int(index), keyframe_dropout) for index in batch["index"]]
    return {**batch, "keyframes_kept": np.asarray(kept, bool)}


def fixed_given(batch: dict[str, np.ndarray], *, given: np.ndarray) -> dict[str, np.ndarray]:
    """The fixed timeline's given mask per row (b, L): all False where the row's keyframes are dropped."""
    kept = np.asarray(batch["keyframes_kept"], bool)
    return {**batch, "latent_given": np.asarray(given, bool)[None] & kept[:, None]}


def _chain(batch: dict[str, np.ndarray], *, steps: tuple) -> dict[str, np.ndarray]:
    for step in steps:
        batch = step(batch)
    return batch


class SRTask(GenTask):
    """Director-SR (see the module docstring)."""

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

    def batch_fields(self, global_batch: int, bucket: int | None = None) -> dict[str, BatchField]:
        fields = super().batch_fields(global_batch, bucket)
        if self.cfg.train.latents == "encode":
            fields["upsampled"] = BatchField(fields["video"].shape, jnp.float32, FRAMES)
        else:
            fields["lowres_latents"] = BatchField(fields["latents"].shape, jnp.float32, FRAMES)
        if not self.per_example:  # per-example keyframe dropout: the given mask is always a batch field
            fields["latent_given"] = BatchField((global_batch, self.layout.num_latents), jnp.bool_, ("batch", None))
        return fields

    def loss(self, model, frozen, batch, key):
        if "latents" in batch:
            latents, lowres = batch["latents"], batch["lowres_latents"]
        else:
            latents = self.encode_latents(frozen, batch, "video")
            lowres = self.encode_latents(frozen, batch, "upsampled")
        b = latents.shape[0]
        text, text_mask = self.batch_text(batch, b)
        given, positions, valid = self.batch_layout(batch, b)
        if not self.per_example:
            given = jnp.asarray(batch["latent_given"], bool) & given
        loss, aux = sr_loss(model, latents, lowres, given, positions, text, key, text_mask=text_mask, valid=valid,
                            **self.flow_options())
        return loss, {**aux, **self.padding_metrics(valid)}

    def train_flops_per_example(self, bucket: int | None = None) -> float:
        """Gen's count plus the patch embedding's extra z low-res input channels."""
        m = self.cfg.model
        d = m.num_attention_heads * m.attention_head_dim
        extra = 2 * self.tokens_per_example(bucket) * math.prod(m.patch_size) * m.in_channels * d
        return super().train_flops_per_example(bucket) + 3.0 * extra

    def describe(self) -> str:
        return (f"{super().describe()}, {self.scale}x SR from "
                f"{self.cfg.video.height // self.scale}x{self.cfg.video.width // self.scale}, "
                f"keyframe dropout {self.keyframe_dropout:g}")

    def data_transform(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        if self.cfg.train.latents == "precomputed":  # a latent cache's rows: degraded and encoded by its writer
            degrade = functools.partial(keyframe_draw, seed=int(self.cfg.seed), keyframe_dropout=self.keyframe_dropout)
        else:
            degrade = functools.partial(degrade_batch, degradation=self.degradation, seed=int(self.cfg.seed),
                                        keyframe_dropout=self.keyframe_dropout)
        if self.per_example:
            plan = functools.partial(plan_batch, shapes=self.shapes, slots=self.cfg.train.latents == "encode")
        else:
            plan = functools.partial(fixed_given, given=np.asarray(self.layout.given))
        return functools.partial(_chain, steps=(degrade, plan))
