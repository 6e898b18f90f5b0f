"""The VAE task: reconstruction of random clips (L1 + KL, optionally MSE, LPIPS, temporal anchors)."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

from director_jax.build import build_vae, vae_config_from
from director_jax.models.lpips import LPIPS
from director_jax.models.timeline import TEMPORAL_FACTOR
from director_jax.train.latent_stats import with_posterior_moments
from director_jax.train.losses import vae_loss
from director_jax.train.task_base import BatchField, Task, synthetic_clips


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

    def tokens_per_example(self, bucket: int | None = None) -> int:
        v = self.cfg.video
        f = self.vae_config.spatial_factor
        return ((v.num_frames - 1) // TEMPORAL_FACTOR + 1) * (v.height // f) * (v.width // f)

    def clips_config(self):
        v = self.cfg.video
        return synthetic_clips(self.cfg, v.num_frames, v.height, v.width)
