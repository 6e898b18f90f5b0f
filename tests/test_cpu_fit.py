"""Training on latent caches (train/cpu_fit.py) and per-example timelines in the Gen / SR tasks.

The demo trains Director-Gen on every keyframe layout at once: each batch carries its rows' given
masks and MC-RoPE positions (``train.layouts_in_batch``). With the fixed layout's own mask and
positions in the batch the loss must equal the fixed-layout task's, bit for bit; the cache trainer
must write a checkpoint that ``generate`` / ``evaluate``'s loader reads back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.configs_common import load_config
from director_jax.eval.checkpoint import load_director_gen
from director_jax.models.timeline import Timeline, encode_timeline
from director_jax.models.vae import WanVAE, WanVAEConfig, normalize_latents
from director_jax.train.cpu_fit import LayoutCache, encode_layouts, train_on_cache, with_latent_stats
from director_jax.train.tasks import make_task
from tests.test_generate import GEN_CONFIG


def _gen_cfg(layouts_in_batch: bool):
    cfg = load_config(GEN_CONFIG)
    cfg.train.latents = "precomputed"
    cfg.train.layouts_in_batch = layouts_in_batch
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    return cfg


def test_layouts_in_batch_equals_the_fixed_layout():
    fixed, per_row = make_task(_gen_cfg(False)), make_task(_gen_cfg(True))
    layout = fixed.layout  # keyframes (0, 16) over 17 frames: 6 latents
    model = fixed.build_fn()()
    b, (length, h, w, z) = 2, fixed._latent_shape()
    latents = jax.random.normal(jax.random.key(1), (b, length, h, w, z))
    key = jax.random.key(2)
    want, _ = fixed.loss(model, None, {"latents": latents}, key)
    batch = {"latents": latents, "given": np.broadcast_to(layout.given, (b, length)),
             "position": np.broadcast_to(layout.position.astype(np.float32), (b, length))}
    got, _ = per_row.loss(model, None, batch, key)
    assert float(got) == float(want)
    assert set(per_row.batch_fields(b)) == {"latents", "given", "position"}
    # another layout (keyframes 0, 8, 16: 7 latents) runs through the same task, and the positions matter
    other = Timeline.from_keyframes(17, [0, 8, 16]).layout
    lat7 = jax.random.normal(jax.random.key(3), (b, other.num_latents, h, w, z))
    batch7 = {"latents": lat7, "given": np.broadcast_to(other.given, (b, 7)),
              "position": np.broadcast_to(other.position.astype(np.float32), (b, 7))}
    a, _ = per_row.loss(model, None, batch7, key)
    shifted, _ = per_row.loss(model, None, {**batch7, "position": batch7["position"] + 0.5}, key)
    stretched, _ = per_row.loss(model, None, {**batch7, "position": batch7["position"] * 2.0}, key)
    assert np.isfinite(float(a))
    assert abs(float(a) - float(shifted)) < 1e-5  # RoPE is relative: a common offset changes nothing
    assert abs(float(a) - float(stretched)) > 1e-4  # other spacings do


def _tiny_vae() -> WanVAE:
    return WanVAE(WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                               temperal_downsample=(True, True)), rngs=nnx.Rngs(0))


def test_encode_layouts_matches_the_timeline_encoder():
    vae = _tiny_vae()
    clips = np.asarray(jax.random.uniform(jax.random.key(0), (3, 17, 16, 16, 3), minval=-1, maxval=1))
    with_latent_stats(vae, clips)
    layouts = [Timeline.from_keyframes(17, [0, 16]).layout, Timeline.from_keyframes(17, [], [(12, 5)]).layout]
    caches = encode_layouts(vae, clips, layouts, batch=2, progress=False)
    assert [c.latents.shape for c in caches] == [(3, 6, 4, 4, 16), (3, 6, 4, 4, 16)]
    for cache, layout in zip(caches, layouts, strict=True):
        mean, _ = encode_timeline(vae, jnp.asarray(clips), layout)
        np.testing.assert_allclose(cache.latents, normalize_latents(mean, vae.config), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="17 frames"):
        encode_layouts(vae, clips[:, :9], layouts[:1], progress=False)


def test_train_on_cache_learns_and_writes_a_loadable_checkpoint(tmp_path):
    cfg = _gen_cfg(True)
    cfg.train.update(dict(steps=60, batch_size=4, log_every=20))
    cfg.optim.update(dict(learning_rate=3e-3, warmup_steps=5, ema_decay=0.9))
    task = make_task(cfg)
    _, h, w, z = task._latent_shape()
    rng = np.random.default_rng(0)
    caches = []
    for keyframes in ([0, 16], [0, 8, 16], [0]):  # 6, 7 and 5 latents: three compiles, one model
        layout = Timeline.from_keyframes(17, keyframes).layout
        base = rng.normal(size=(1, 1, h, w, z)).astype(np.float32)  # one pattern to learn, plus a little noise
        latents = np.broadcast_to(base, (8, layout.num_latents, h, w, z)) + 0.1 * rng.normal(
            size=(8, layout.num_latents, h, w, z)).astype(np.float32)
        caches.append(LayoutCache(layout, latents))
    report = train_on_cache(cfg, caches, tmp_path, progress=False)
    losses = [e["loss"] for e in report["history"]]
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
    model, loaded = load_director_gen(cfg, tmp_path, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert loaded.step == 60 and loaded.weights == "ema"
    init = jax.tree.leaves(nnx.state(task.build_fn()(), nnx.Param))
    trained = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(init, trained, strict=True)) > 1e-3
    with pytest.raises(ValueError, match="batch_size"):
        train_on_cache(cfg, [LayoutCache(caches[0].layout, caches[0].latents[:2])], tmp_path / "x", progress=False)
