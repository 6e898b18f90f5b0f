"""Director-SR training (SRTask in the real trainer) and inference (pipeline.sr.super_resolve)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from director_jax.build import build_director_sr
from director_jax.configs_common import load_config
from director_jax.convert.dit import export_transformer
from director_jax.convert.vae import export_vae
from director_jax.data.degradations import DegradationConfig, degrade
from director_jax.data.task_sampling import spans_from_masks
from director_jax.models.dit import WanDiT, WanDiTConfig
from director_jax.models.sr import DirectorSR
from director_jax.models.timeline import Timeline
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.pipeline.codec import jitted_codec
from director_jax.pipeline.sr import super_resolve
from director_jax.train.tasks import SRTask, keyframes_kept, make_task
from director_jax.train.trainer import build_run, make_data, train

ROOT = Path(__file__).resolve().parents[1]
Z = 4
SMALL_VAE = dict(base_dim=8, z_dim=Z, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
                 temperal_downsample=(False, True, True), latents_mean=(0.0,) * Z, latents_std=(1.0,) * Z)


def tiny_sr_config(steps: int = 16):
    """configs/sr_tiny.py at test size: 9 frames of 32x32, keyframes 0 and 8, 2x SR from 16x16, a narrow VAE."""
    cfg = load_config(ROOT / "configs" / "sr_tiny.py")
    cfg.video.update(dict(height=32, width=32, num_frames=9))
    cfg.vae.update(SMALL_VAE)
    cfg.model.update(dict(in_channels=Z, out_channels=Z))
    cfg.degradation.update(dict(scales=(2,), blur_prob=0.5, noise_prob=0.5, jpeg_prob=0.5, codec_prob=0.5))
    cfg.train.update(dict(steps=steps, batch_size=8, log_every=1, keyframes=(0, 8), keyframe_dropout=0.5,
                          timelines="fixed"))
    cfg.optim.update(dict(learning_rate=3e-3, warmup_steps=2, decay_steps=steps))
    cfg.checkpoint.every = steps
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
    return cfg


def test_sr_task_batch_holds_the_degraded_clips_seeded_per_example():
    cfg = tiny_sr_config()
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    assert isinstance(run.task, SRTask) and run.task.scale == 2
    assert set(run.batch_fields) == {"video", "upsampled", "latent_given"}
    data = make_data(run)
    batch = next(data)
    layout = run.task.layout
    assert batch["video"].shape == (8, 9, 32, 32, 3) and batch["upsampled"].shape == (8, 9, 32, 32, 3)
    assert batch["lowres"].shape == (8, 9, 16, 16, 3) and batch["latent_given"].shape == (8, layout.num_latents)
    config = DegradationConfig.from_config(cfg.degradation)
    for row, index in enumerate(batch["index"]):
        pixels = np.clip(np.rint((batch["video"][row] + 1.0) * 127.5), 0, 255).astype(np.uint8)
        direct = degrade(pixels, config, (int(cfg.seed), int(index)))
        np.testing.assert_array_equal(np.rint((batch["lowres"][row] + 1.0) * 127.5).astype(np.uint8), direct.lowres)
        np.testing.assert_array_equal(np.rint((batch["upsampled"][row] + 1.0) * 127.5).astype(np.uint8),
                                      direct.upsampled)
        kept = keyframes_kept(int(cfg.seed), int(index), 0.5)
        np.testing.assert_array_equal(batch["latent_given"][row], layout.given & kept)
        assert batch["keyframes_kept"][row] == kept
    assert 0 < batch["latent_given"].any(axis=1).sum() < 8  # with dropout 0.5 both kinds are in this batch (seed 0)


def test_sr_task_with_per_example_timelines_drops_each_rows_own_keyframes(tmp_path):
    cfg = tiny_sr_config(steps=1)
    cfg.train.timelines = "per_example"
    run = build_run(cfg, devices=jax.devices()[:1], materialize_frozen=False)
    batch = next(make_data(run))
    assert batch["lowres"].shape == (8, 9, 16, 16, 3) and batch["slot_frames_0"].shape == (8, 9)
    for row, index in enumerate(batch["index"]):
        layout = Timeline(9, tuple(spans_from_masks(batch["given"][row], batch["given_start"][row]))).layout
        kept = keyframes_kept(int(cfg.seed), int(index), 0.5)
        np.testing.assert_array_equal(batch["latent_given"][row, :layout.num_latents], layout.given & kept)
    assert len({tuple(g) for g in batch["given"]}) > 1  # rows of one batch with different timelines
    cfg.vae.init_from = "random"
    result = train(cfg, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    assert result.final_step == 1 and np.isfinite(result.losses[1])


def test_sr_task_trains_with_the_real_trainer(tmp_path):
    cfg = tiny_sr_config(steps=16)
    result = train(cfg, tmp_path, devices=jax.devices()[:1], progress=False)
    losses = np.array([result.losses[s] for s in range(1, 17)])
    assert np.isfinite(losses).all() and result.final_step == 16
    assert losses[-4:].mean() < 0.8 * losses[:4].mean(), losses  # measured: first four 1.21, last four 0.57
    assert (tmp_path / "checkpoints" / "16").is_dir()


def test_sr_model_starts_from_a_gen_checkpoint_or_an_sr_one(tmp_path):
    cfg = tiny_sr_config()
    gen = WanDiT(WanDiTConfig.from_diffusers_config(cfg.model.to_dict()), rngs=nnx.Rngs(3))
    cfg.init_from = str(export_transformer(gen, tmp_path / "gen"))
    sr = build_director_sr(cfg)
    kernel = np.asarray(sr.dit.patch_embedding.kernel.get_value())
    np.testing.assert_array_equal(kernel[..., :Z, :], np.asarray(gen.patch_embedding.kernel.get_value()))
    assert not kernel[..., Z:, :].any()  # low-res channels start at zero: SR == Gen at init
    cfg.init_from = str(export_transformer(sr.dit, tmp_path / "sr"))
    again = build_director_sr(cfg)
    np.testing.assert_array_equal(np.asarray(again.dit.patch_embedding.kernel.get_value()), kernel)
    cfg.model.num_layers = 1
    with pytest.raises(ValueError, match="Fix --config.model"):
        build_director_sr(cfg)


def test_sr_task_takes_the_latent_statistics_of_its_vae_directory(tmp_path):
    cfg = tiny_sr_config()
    stats = dict(latents_mean=(0.5, -0.5, 0.1, 0.0), latents_std=(2.0, 0.5, 1.0, 3.0))
    vae = WanVAE(WanVAEConfig(**{**SMALL_VAE, **stats}), rngs=nnx.Rngs(0))
    cfg.vae.init_from = str(export_vae(vae, tmp_path / "vae"))
    task = make_task(cfg)
    assert task.vae_config.latents_mean == stats["latents_mean"] and task.vae_config.latents_std == stats["latents_std"]
    cfg.vae.base_dim = 16
    with pytest.raises(ValueError, match="base_dim=8"):
        make_task(cfg)


@pytest.mark.parametrize("change, match", [
    (dict(degradation=dict(scales=(2, 4))), "upsamples by one factor"),
    (dict(train=dict(keyframe_dropout=1.5)), "keyframe_dropout is a probability"),
    (dict(model=dict(in_channels=8, out_channels=8)), "z_dim 4"),
    (dict(video=dict(height=40, width=40)), "multiple of 16"),
])
def test_sr_task_config_errors_name_the_fix(change, match):
    cfg = tiny_sr_config()
    for section, values in change.items():
        cfg[section].update(values)
    with pytest.raises(ValueError, match=match):
        make_task(cfg)


# ------------------------------------------------------------------------------------------------
# super_resolve


@pytest.fixture(scope="module")
def models():
    """A random SR DiT (2 layers) and a random narrow VAE with latents of unit scale; 9 frames of 16x16 -> 64x64."""
    gen = WanDiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=Z, out_channels=Z, text_dim=16,
                       freq_dim=32, ffn_dim=64, num_layers=2)
    sr = DirectorSR.init(gen, rngs=nnx.Rngs(1))
    vae = WanVAE(WanVAEConfig(**SMALL_VAE), rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    lowres = rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    keyframes = {0: rng.uniform(-1, 1, (64, 64, 3)).astype(np.float32),
                 8: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}
    return sr, vae, lowres, keyframes


def _round_trip(vae, image):
    """A keyframe encoded alone and decoded: what the clean tokens must decode to."""
    encode, decode = jitted_codec(vae)
    image = image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image
    mean, _ = encode(jnp.asarray(image[None, None]))
    return np.clip(np.asarray(decode(mean))[0, 0], -1, 1)


def test_super_resolve_with_and_without_keyframes_and_tiled(models):
    sr, vae, lowres, keyframes = models
    key = jax.random.key(0)
    layout = Timeline.from_keyframes(9, sorted(keyframes)).layout
    anchored = super_resolve(sr, vae, lowres, keyframes, scale=4, key=key, steps=2)
    free = super_resolve(sr, vae, lowres, None, scale=4, key=key, steps=2, layout=layout)
    tiled = super_resolve(sr, vae, lowres[None], keyframes, scale=4, key=key, steps=2, tile=4)
    assert anchored.shape == free.shape == (9, 64, 64, 3) and tiled.shape == (1, 9, 64, 64, 3)
    for video in (anchored, tiled[0]):
        assert video.dtype == np.float32 and np.abs(video).max() <= 1.0
        for frame, image in keyframes.items():  # measured: max |diff| <= 1e-6
            np.testing.assert_allclose(video[frame], _round_trip(vae, image), rtol=0, atol=1e-5)
    assert np.abs(free[0] - anchored[0]).max() > 1e-2  # without anchors frame 0 is generated, not given
    partial, latents = super_resolve(sr, vae, lowres, {0: keyframes[0]}, scale=4, key=key, steps=2, layout=layout,
                                     return_latents=True)
    np.testing.assert_allclose(partial[0], anchored[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(latents["given"], [[True, False, False, False]])  # latent 3 is frame 8's chunk
    assert latents["sampled"].shape == latents["lowres"].shape == (1, 4, 8, 8, Z)
    assert np.abs(partial[8] - anchored[8]).max() > 1e-2  # a layout chunk without a keyframe is generated


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(keyframes={0: np.zeros((60, 64, 3), np.float32)}), ValueError, "needs 64x64 keyframes"),
    (dict(keyframes={9: np.zeros((64, 64, 3), np.float32)}), ValueError, r"valid frames are 0\.\.8"),
    (dict(keyframes={-1: np.zeros((64, 64, 3), np.float32)}), ValueError, r"valid frames are 0\.\.8"),
    (dict(keyframes={2.0: np.zeros((64, 64, 3), np.float32)}), TypeError, "must be integers"),
    (dict(keyframes={True: np.zeros((64, 64, 3), np.float32)}), TypeError, "must be integers"),
    (dict(keyframes={0: np.zeros((64, 64, 3), np.int32)}), TypeError, "uint8 frames in"),
    (dict(keyframes={0: np.full((64, 64, 3), 2.0, np.float32)}), ValueError, r"must lie in \[-1, 1\]"),
    (dict(video=np.zeros((9, 16, 16, 3), np.int64)), TypeError, "dtype int64"),
    (dict(video=np.full((9, 16, 16, 3), 255.0, np.float32)), ValueError, r"must lie in \[-1, 1\]"),
    (dict(video=np.zeros((9, 14, 16, 3), np.float32)), ValueError, r"crop the low-res video to a multiple of 4x4"),
    (dict(video=np.zeros((9, 16, 16), np.float32)), ValueError, r"\(T, h, w, 3\)"),
    (dict(scale=2.5), ValueError, "scale must be an integer"),
    (dict(keyframes={4: np.zeros((64, 64, 3), np.float32)}, layout=Timeline.from_keyframes(9, [0, 8])), ValueError,
     r"frames \[4\] do not start a chunk of the layout \(chunks start at \[0, 8\]\)"),
    (dict(layout=Timeline.from_keyframes(10, [0])), ValueError, "has 10 frames but the low-res video has 9"),
])
def test_super_resolve_bad_inputs_say_what_to_fix(models, kwargs, error, match):
    sr, vae, lowres, _ = models
    video = kwargs.pop("video", lowres)
    keyframes = kwargs.pop("keyframes", None)
    kwargs.setdefault("scale", 4)
    with pytest.raises(error, match=match):
        super_resolve(sr, vae, video, keyframes, key=jax.random.key(0), **kwargs)
