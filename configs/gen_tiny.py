"""Director-Gen at toy size for the tests and the CPU demo: Wan's architecture, 2 layers of width 64.

    python -m director_jax.train --config configs/gen_tiny.py --workdir runs/gen_tiny
    python -m director_jax.train --config configs/gen_tiny.py --workdir runs/gen_tiny \\
        --config.mesh.data 2 --config.mesh.fsdp 4 --config.train.micro_batches 2

The text encoder is a tiny random umT5 (d_model 32), so text_dim is 32; video is 32x32 at 8 fps.
Training runs on synthetic movies, unconditionally (no captions yet), with keyframes at the first
and last frame, latents encoded in the step by the tiny VAE (random unless vae.init_from is set).
Float32 compute: bf16 is slow on CPUs and the tests compare meshes at 1e-5.
"""

import ml_collections

from director_jax.configs_common import gen_config


def get_config() -> ml_collections.ConfigDict:
    c = gen_config(dim=64, heads=2, layers=2, ffn=128, height=32, width=32, shift=1.0)
    c.model.text_dim = 32
    c.model.freq_dim = 64
    c.model_options.dtype = "float32"
    c.model_options.remat_policy = "none"
    c.text.max_length = 64
    c.text.conditioning = False
    c.video.num_frames = 17
    c.video.fps = 8.0
    c.sampler.steps = 20
    c.sampler.guidance_scale = 1.0

    # The demo's tiny VAE: Wan2.1's blocks at base width 16.
    c.vae.update(dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, attn_scales=(),
                      temperal_downsample=(False, True, True)))

    c.train.update(dict(steps=200, batch_size=8, log_every=10, keyframes=(0, 16), latents="encode"))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=10, ema_decay=0.99))
    c.checkpoint.update(dict(every=50, keep_last=2, keep_every=100))
    c.data.synthetic.fps = c.video.fps
    return c
