"""The Wan2.1 VAE at toy width (the CPU demo's), for the walkthrough, the tests and CPU experiments.

    python -m director_jax.train --config configs/vae_tiny.py --workdir runs/vae \\
        --config.data.source curated --config.data.curated.dir curated

Wan2.1's blocks at base width 16 with 4x spatial compression (two downsampling stages instead of
Wan's three: at 32x32 an 8x VAE leaves a 4x4 latent, which a fit of CPU minutes cannot decode to
keyframe fidelity) and Wan's 4x temporal compression, 16 latent channels. Trained on 5-frame clips
(a single-frame latent, as keyframes are encoded, and a 4-frame one) with L1 + MSE + a tiny KL on
the posterior mean. Kernels start 8x PyTorch's default scale and the temporal taps as an inflated
image VAE (``models/vae_init.py`` says why). Measured on held-out synthetic frames (single-frame
round trip, this config on synthetic movies): 21.1 dB after 250 steps, 22.7 / 23.9 / 24.6 / 24.8 dB
after 500 / 750 / 1000 / 1250; ``train.anchor_weight`` (the CPU demo's temporal anchor, 0.1 there)
slowed the first steps (15.8 dB at 250 with batch 4). The checkpoint keeps running statistics of
the latents, which Gen and SR runs on this VAE normalise with.
"""

import ml_collections

from director_jax.configs_common import add_training


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vae = ml_collections.ConfigDict(dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1,
                                           attn_scales=(), temperal_downsample=(True, True), init_from=""))
    c.vae_init = ml_collections.ConfigDict(dict(kernel_scale=8.0, inflate=True))
    c.model_options = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32"))
    c.video = ml_collections.ConfigDict(dict(height=32, width=32, num_frames=5, fps=8.0))
    add_training(c, task="vae", batch_size=8, steps=2000, learning_rate=5e-3, warmup_steps=50)
    c.train.update(dict(mse_weight=1.0, anchor_weight=0.0))
    c.optim.update(dict(weight_decay=1e-4, ema_decay=0.99))
    c.checkpoint.update(dict(every=500, keep_last=2))
    c.data.synthetic.fps = c.video.fps
    return c
