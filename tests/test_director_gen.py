"""Director-Gen end to end on a tiny model: overfit one synthetic timeline, sample it back, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from director_jax.data.synthetic import make_movie
from director_jax.models.dit import DirectorGen, WanDiT, WanDiTConfig
from director_jax.models.multichunk import decode_timeline, encode_timeline
from director_jax.models.timeline import Timeline
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.pipeline.gen import generate_latents, generate_video, timeline_latents
from director_jax.train.losses import gen_loss

Z = 4
VAE_ARCH = dict(base_dim=8, z_dim=Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
DIT_CFG = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z, text_dim=8,
                       freq_dim=32, ffn_dim=64, num_layers=2)
TIMELINE = Timeline.from_keyframes(17, [0, 7, 16])  # chunks of 7, 9 and 1 frames: 3 + 3 + 1 latents


@pytest.fixture(scope="module")
def setup():
    video = jnp.asarray(make_movie(3, [17], 32, 32).frames)[None]
    layout = TIMELINE.layout
    # latent statistics measured on the clip, as Wan's latents_mean / latents_std are on its data,
    # so the normalized latents have unit scale
    raw, _ = encode_timeline(WanVAE(WanVAEConfig(**VAE_ARCH, latents_mean=(0.0,) * Z, latents_std=(1.0,) * Z),
                                    rngs=nnx.Rngs(0)), video, layout)
    stats = dict(latents_mean=tuple(np.asarray(raw).mean(axis=(0, 1, 2, 3)).tolist()),
                 latents_std=tuple(np.asarray(raw).std(axis=(0, 1, 2, 3)).tolist()))
    vae = WanVAE(WanVAEConfig(**VAE_ARCH, **stats), rngs=nnx.Rngs(0))  # same weights (same seed)
    latents = timeline_latents(vae, video, layout)
    text = jax.random.normal(jax.random.key(5), (1, 6, DIT_CFG.text_dim))
    return vae, video, layout, latents, text


def _train(gen, latents, layout, text, steps):
    optimizer = nnx.Optimizer(gen, optax.adamw(optax.warmup_cosine_decay_schedule(0, 4e-3, 20, steps, 1e-4)),
                              wrt=nnx.Param)
    given = jnp.broadcast_to(jnp.asarray(layout.given), (8, layout.num_latents))
    batch = jnp.repeat(latents, 8, axis=0)  # one timeline, 8 noise draws per step
    texts = jnp.repeat(text, 8, axis=0)
    positions = jnp.asarray(layout.position)

    def loss_fn(model, key):
        return gen_loss(model, batch, given, positions, texts, key)[0]

    @nnx.jit
    def step(model, optimizer, key):
        loss, grads = nnx.value_and_grad(loss_fn)(model, key)
        optimizer.update(model, grads)
        return loss

    eval_loss = nnx.jit(loss_fn)

    def evaluate(model):  # the same 16 draws of time and noise (x 8) before and after training
        return np.mean([float(eval_loss(model, jax.random.key(1000 + i))) for i in range(16)])

    before = float(evaluate(gen))
    for i in range(steps):
        step(gen, optimizer, jax.random.key(i))
    return before, float(evaluate(gen))


def test_overfits_one_timeline_and_samples_it_back(setup):
    vae, video, layout, latents, text = setup
    gen = DirectorGen(WanDiT(DIT_CFG, rngs=nnx.Rngs(1)))
    before, after = _train(gen, latents, layout, text, steps=600)
    print(f"flow loss {before:.4f} -> {after:.4f}")
    assert after < before / 10

    given_video = jnp.where(jnp.isin(jnp.arange(17), jnp.array([0, 7, 16]))[None, :, None, None, None], video, 0.0)
    out, sampled = generate_video(gen, vae, layout, given_video, text, key=jax.random.key(0), steps=30,
                                  sampler="unipc", shift=1.0, progress=False)
    # given latents come back exactly; the generated ones are the training timeline's
    given = layout.given
    np.testing.assert_array_equal(np.asarray(sampled)[0, given], np.asarray(latents)[0, given])
    err = np.mean((np.asarray(sampled)[0, ~given] - np.asarray(latents)[0, ~given]) ** 2)
    spread = np.var(np.asarray(latents)[0, ~given])
    print(f"generated-latent MSE {err:.4f} vs latent variance {spread:.4f}")
    assert err < 0.02 * spread
    # each keyframe's decoded frame is the VAE reconstruction of that keyframe
    mean, _ = encode_timeline(vae, video, layout)
    recon = decode_timeline(vae, mean, layout)
    for frame in (0, 7, 16):
        np.testing.assert_allclose(np.asarray(out)[0, frame], np.asarray(recon)[0, frame], atol=1e-4)
    # same key, same video
    again, _ = generate_video(gen, vae, layout, given_video, text, key=jax.random.key(0), steps=30,
                              sampler="unipc", shift=1.0, progress=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(out))


def test_bad_input_is_named(setup):
    vae, video, layout, latents, text = setup
    gen = DirectorGen(WanDiT(DIT_CFG, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match=r"given latents must be \(B, 7, h, w, 4\)"):
        generate_latents(gen, layout, latents[:, :5], text, key=jax.random.key(0), steps=2, progress=False)
    odd = jnp.zeros((1, 7, 3, 4, Z))  # a 24x32 keyframe: 3 latent rows, not a multiple of the 2x2 patch
    with pytest.raises(ValueError, match="not a multiple of the DiT patch 2x2"):
        generate_latents(gen, layout, odd, text, key=jax.random.key(0), steps=2, progress=False)
    with pytest.raises(ValueError, match="lie outside the timeline of 17 frames"):
        Timeline.from_keyframes(17, [0, 17])
    with pytest.raises(ValueError, match="needs uncond"):
        generate_latents(gen, layout, latents, text, key=jax.random.key(0), steps=2, guidance_scale=5.0,
                         progress=False)


def test_keyframe_dropout_drops_whole_rows_and_reaches_the_gen_loss():
    from pathlib import Path

    from director_jax.configs_common import load_config
    from director_jax.train.losses import drop_keyframes
    from director_jax.train.tasks import GenTask

    given = jnp.asarray(np.tile(np.array([True, False, False, True, False]), (400, 1)))
    keys = jax.random.split(jax.random.key(3), 400)  # one key per example, as the trainer passes them
    np.testing.assert_array_equal(np.asarray(drop_keyframes(given, keys, 0.0)), np.asarray(given))
    assert not np.asarray(drop_keyframes(given, keys, 1.0)).any()
    half = np.asarray(drop_keyframes(given, keys, 0.3))
    kept = half.any(axis=1)
    np.testing.assert_array_equal(half[kept], np.asarray(given)[kept])  # a kept row keeps every keyframe
    assert 0.22 < 1 - kept.mean() < 0.38  # ~30% of 400 rows dropped (binomial sd 2.3%)
    np.testing.assert_array_equal(np.asarray(drop_keyframes(given, keys, 0.3)), half)  # a pure function of the keys
    one_key = np.asarray(drop_keyframes(given, jax.random.key(4), 0.3))
    assert 0.22 < 1 - one_key.any(axis=1).mean() < 0.38

    # GenTask applies train.keyframe_dropout in its loss: at 1.0 the loss is gen_loss with no given frames.
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gen_tiny.py")
    cfg.train.update(dict(latents="precomputed", keyframe_dropout=1.0, timelines="fixed"))
    task = GenTask(cfg)
    model = task.build_fn()()
    latents = jax.random.normal(jax.random.key(6), (2, *task._latent_shape()))
    key = jax.random.split(jax.random.key(7), 2)
    loss, _ = task.loss(model, None, {"latents": latents}, key)
    text, mask = task.batch_text({}, 2)
    free = jnp.zeros((2, task.layout.num_latents), bool)
    positions = jnp.asarray(task.layout.position)
    expect, _ = gen_loss(model, latents, free, positions, text, key, text_mask=mask, timestep_sampling="logit_normal")
    with_keyframes, _ = gen_loss(model, latents, jnp.broadcast_to(jnp.asarray(task.layout.given), free.shape),
                                 positions, text, key, text_mask=mask, timestep_sampling="logit_normal")
    np.testing.assert_allclose(float(loss), float(expect), rtol=1e-6)
    assert abs(float(loss) - float(with_keyframes)) > 1e-4
    cfg.train.keyframe_dropout = 1.5
    with pytest.raises(ValueError, match="keyframe_dropout is a probability"):
        GenTask(cfg)
