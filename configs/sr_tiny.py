"""Director-SR at toy size for the walkthrough, the tests, the CPU benchmark and the demo: 2x, 32x32 -> 64x64.

    python -m director_jax.train --config configs/sr_tiny.py --workdir runs/sr --config.vae.init_from runs/vae \
        --config.data.source curated --config.data.curated.dir curated
    python benchmarks/sr.py          # fits the VAE, trains this model on a latent cache, measures vs bicubic

The SR DiT is a tiny Wan DiT (2 layers of width 128, 2x2 patches) with the low-res latents on extra
input channels. Examples are 17-frame clips with keyframes at the first and last frame; each is
degraded on the host (blur, 2x downscale, noise, JPEG, H.264, seeded per example) and upsampled
back, and the frozen VAE encodes both clips in the step. A quarter of the examples drop their
keyframes, so one model serves with and without anchors. The VAE (``configs/vae_tiny.py``'s
architecture) must be a trained one (``vae.init_from``: a trainer run or a diffusers directory; its
latent statistics normalise the latents). Float32 compute, as gen_tiny.
"""

import ml_collections

from director_jax.configs_common import gen_config


def get_config() -> ml_collections.ConfigDict:
    # Width 128, twice gen_tiny's: a token's input is a 2x2 patch of 2 x 16 channels (noisy + low-res latents,
    # 128 numbers), and at width 64 the model could not even pass the low-res latents through (its 1-step latents
    # were further from the truth than the low-res latents themselves: RMSE 0.37 vs 0.26).
    c = gen_config(dim=128, heads=2, layers=2, ffn=256, height=64, width=64, shift=1.0)
    c.task = "sr"
    c.model.text_dim = 32
    c.model.freq_dim = 64
    c.model_options.dtype = "float32"
    c.model_options.remat_policy = "none"
    c.text.max_length = 64
    c.text.conditioning = False
    c.video.num_frames = 17
    c.video.fps = 8.0
    c.sampler.update(dict(name="euler", steps=4, shift=1.0, guidance_scale=1.0))
    # Few-step sampling evaluates the model at t = 1, 0.75, ...: train on uniform t (logit-normal rarely draws
    # t near 1, where a 1-step sample is made).
    c.flow.timestep_sampling = "uniform"

    # configs/vae_tiny.py's VAE (the demo's): Wan2.1's blocks at base width 16, 4x spatial compression.
    c.vae.update(dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                      temperal_downsample=(True, True)))

    # DegradationConfig fields: one scale; milder than the Real-ESRGAN-like defaults (a Gen output
    # at low res is clean-ish), every step still on for part of the clips.
    c.degradation = ml_collections.ConfigDict(dict(
        scales=(2,), down_kernels=("bicubic", "bilinear", "area"), blur_prob=0.3, blur_sigma=(0.3, 1.5),
        noise_prob=0.3, noise_sigma=(1.0, 6.0), jpeg_prob=0.3, jpeg_quality=(60, 95), codec_prob=0.2,
        codec_crf=(18, 30), codec_preset="veryfast"))

    # 300 steps: ~6 min on 2 CPU cores (64x64 clips, both encoded in the step); benchmarks/sr.py sets its own budget.
    c.train.update(dict(steps=300, batch_size=8, log_every=10, keyframes=(0, 16), latents="encode",
                        keyframe_dropout=0.25, timelines="per_example"))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=20, ema_decay=0.99))
    c.checkpoint.update(dict(every=100, keep_last=2))
    c.data.synthetic.fps = c.video.fps
    # Shots of 64-96 frames: the synthetic shapes cross the frame once per shot, so ~0.2-1.2 pixels per frame at
    # 64x64 (1-2% of the width, as in film); the default 20-28 frame shots move 4x faster.
    c.data.synthetic.shot_lengths = (64, 96)
    return c
