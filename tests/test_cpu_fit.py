"""The demo's VAE fit (demo/cpu_fit.py) and per-example timelines in the Gen / SR tasks.

With per-example timelines each batch carries its rows' given masks and MC-RoPE positions
(``train.timelines='per_example'``); with the fixed layout's own mask and positions in the batch the
loss must equal the fixed-layout task's, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.configs_common import load_config
from director_jax.demo.cpu_fit import fit_vae, with_latent_stats
from director_jax.models.timeline import Timeline
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.models.vae_init import inflate_temporal_kernels, scale_conv_kernels
from director_jax.train.losses import temporal_anchor_loss
from director_jax.train.tasks import make_task
from tests.test_generate import GEN_CONFIG


def _gen_cfg(per_example: bool):
    cfg = load_config(GEN_CONFIG)
    cfg.train.latents = "precomputed"
    cfg.train.timelines = "per_example" if per_example else "fixed"
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    cfg.video.update(dict(height=16, width=16))  # 4x4 latents: small token counts for CPU fits
    return cfg


def test_per_example_timelines_equal_the_fixed_layout():
    fixed, per_row = make_task(_gen_cfg(False)), make_task(_gen_cfg(True))
    layout = fixed.layout  # keyframes (0, 16) over 17 frames: 6 latents
    model = fixed.build_fn()()
    b, (length, h, w, z) = 2, fixed._latent_shape()
    latents = jax.random.normal(jax.random.key(1), (b, length, h, w, z))
    key = jax.random.key(2)
    want, _ = fixed.loss(model, None, {"latents": latents}, key)
    batch = {"latents": latents, "latent_given": np.broadcast_to(layout.given, (b, length)),
             "latent_valid": np.ones((b, length), bool),
             "latent_position": np.broadcast_to(layout.position.astype(np.float32), (b, length))}
    got, _ = per_row.loss(model, None, batch, key)
    assert float(got) == float(want)
    assert set(per_row.batch_fields(b)) == {"latents", "latent_given", "latent_valid", "latent_position"}
    # another layout (keyframes 0, 8, 16: 7 latents) runs through the same task, and the positions matter
    other = Timeline.from_keyframes(17, [0, 8, 16]).layout
    lat7 = jax.random.normal(jax.random.key(3), (b, other.num_latents, h, w, z))
    batch7 = {"latents": lat7, "latent_given": np.broadcast_to(other.given, (b, 7)),
              "latent_valid": np.ones((b, 7), bool),
              "latent_position": np.broadcast_to(other.position.astype(np.float32), (b, 7))}
    a, _ = per_row.loss(model, None, batch7, key)
    shifted, _ = per_row.loss(model, None, {**batch7, "latent_position": batch7["latent_position"] + 0.5}, key)
    stretched, _ = per_row.loss(model, None, {**batch7, "latent_position": batch7["latent_position"] * 2.0}, key)
    assert np.isfinite(float(a))
    assert abs(float(a) - float(shifted)) < 1e-5  # RoPE is relative: a common offset changes nothing
    assert abs(float(a) - float(stretched)) > 1e-4  # other spacings do


def _tiny_vae() -> WanVAE:
    return WanVAE(WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                               temperal_downsample=(True, True)), rngs=nnx.Rngs(0))


def test_inflated_vae_starts_as_an_image_vae():
    """After inflation each latent depends on its own frames only: a static clip encodes to equal latents and
    decodes to a static clip; changing a late frame leaves the earlier latents and decoded frames unchanged."""
    vae = _tiny_vae()
    scale_conv_kernels(vae, 8.0)
    rng = np.random.default_rng(0)
    frame = rng.uniform(-1, 1, (1, 1, 16, 16, 3)).astype(np.float32)
    static = jnp.asarray(np.repeat(frame, 9, axis=1))
    before, _ = vae.encode(static)
    assert float(jnp.max(jnp.abs(before[:, 1:] - before[:, 1:2]))) > 1e-3  # random 3D kernels mix in history
    inflate_temporal_kernels(vae)
    mean, _ = vae.encode(static)
    assert mean.shape[1] == 3
    np.testing.assert_allclose(np.asarray(mean[:, 1:]), np.asarray(jnp.broadcast_to(mean[:, 1:2], mean[:, 1:].shape)),
                               atol=1e-5)
    decoded = np.asarray(vae.decode(mean))
    np.testing.assert_allclose(decoded, np.broadcast_to(decoded[:, :1], decoded.shape), atol=1e-5)
    moved = np.asarray(static).copy()
    moved[:, 8] = rng.uniform(-1, 1, moved[:, 8].shape)  # the last frame of the last latent
    mean2, _ = vae.encode(jnp.asarray(moved))
    np.testing.assert_allclose(np.asarray(mean2[:, :2]), np.asarray(mean[:, :2]), atol=1e-5)
    assert float(jnp.max(jnp.abs(mean2[:, 2] - mean[:, 2]))) > 1e-3


@pytest.mark.slow  # the demo's VAE fit; the demo itself runs it in full
def test_temporal_anchor_loss_is_zero_for_an_inflated_vae_and_fit_vae_learns():
    """The anchor (later latents vs the image latents of their newest frames) is exactly what inflation gives at
    initialization, and not what random 3D kernels give; a short fit lowers the reconstruction error, and with
    the anchor term the later latents end closer to their image latents than the same fit without it."""
    yy, xx = np.mgrid[0:16, 0:16] / 16.0

    def clips(n: int, frames: int, seed: int) -> np.ndarray:  # moving soft blobs on gradients: learnable content
        rng = np.random.default_rng(seed)
        out = np.zeros((n, frames, 16, 16, 3), np.float32)
        for i in range(n):
            c, v, col = rng.uniform(0.2, 0.8, 2), rng.uniform(-0.03, 0.03, 2), rng.uniform(-1, 1, 3)
            for t in range(frames):
                cy, cx = c + t * v
                blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
                out[i, t] = (1 - blob) * (yy[..., None] - 0.5) + blob * col
        return out

    video = jnp.asarray(clips(2, 9, seed=10**6))
    random_vae = _tiny_vae()
    scale_conv_kernels(random_vae, 8.0)
    assert float(temporal_anchor_loss(random_vae, video, random_vae.encode(video)[0])) > 1e-2

    def fitted(anchor_weight: float) -> tuple[WanVAE, list[dict]]:
        vae = _tiny_vae()
        scale_conv_kernels(vae, 8.0)
        inflate_temporal_kernels(vae)
        assert float(temporal_anchor_loss(vae, video, vae.encode(video)[0])) < 1e-8
        history = fit_vae(vae, lambda i, r: clips(4, 1, i) if i % 2 == 0 else clips(2, 9, i), 60,
                          learning_rate=5e-3, mse_weight=1.0, anchor_weight=anchor_weight, log_every=20,
                          progress=False)
        return vae, history

    anchored, history = fitted(0.1)
    assert [h["step"] for h in history] == [20, 40, 60]
    assert history[-1]["l1"] < 0.8 * history[0]["l1"]
    free, _ = fitted(0.0)
    drift = {name: float(temporal_anchor_loss(vae, video, vae.encode(video)[0]))
             for name, vae in (("anchored", anchored), ("free", free))}
    assert drift["anchored"] < drift["free"], drift


def test_a_fitted_vae_reads_back_with_its_own_latent_statistics(tmp_path):
    """The latents Gen trains on (the fitted VAE's cache) and the keyframe latents generate / evaluate encode (the
    VAE loaded from the model config's vae.init_from) must be normalised alike: the statistics come from the
    directory. (They once came from Wan2.1's defaults: keyframes off by ~2x.)"""
    from director_jax.build import load_frozen_vae
    from director_jax.convert.vae import export_vae
    from director_jax.pipeline.gen import timeline_latents
    from director_jax.train.tasks import make_task

    vae = _tiny_vae()
    clips = np.asarray(jax.random.uniform(jax.random.key(4), (2, 17, 16, 16, 3), minval=-1, maxval=0.5))
    with_latent_stats(vae, clips)
    export_vae(vae, tmp_path / "vae")
    cfg = load_config(GEN_CONFIG)
    cfg.vae.update(dict(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                        temperal_downsample=(True, True), init_from=str(tmp_path / "vae")))
    loaded = load_frozen_vae(cfg, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    np.testing.assert_allclose(loaded.config.latents_mean, vae.config.latents_mean, rtol=1e-6)
    np.testing.assert_allclose(loaded.config.latents_std, vae.config.latents_std, rtol=1e-6)
    layout = Timeline.from_keyframes(17, [0, 16]).layout
    np.testing.assert_allclose(timeline_latents(vae, jnp.asarray(clips), layout),
                               timeline_latents(loaded, jnp.asarray(clips), layout), atol=1e-5)
    cfg.train.latents = "encode"  # the trainer's frozen VAE (Gen tasks that encode in the step) reads them alike
    assert make_task(cfg).frozen_model().config.latents_mean == vae.config.latents_mean
    cfg.vae.base_dim = 16  # a config describing another VAE than the directory's is refused
    with pytest.raises(ValueError, match="describes another VAE"):
        load_frozen_vae(cfg, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
