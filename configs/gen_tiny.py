"""Director-Gen at toy size for the walkthrough, the tests and the CPU demo: Wan's architecture, 2 layers of width 64.

    python -m director_jax.train --config configs/gen_tiny.py --workdir runs/gen --config.vae.init_from runs/vae \
        --config.data.source curated --config.data.curated.dir curated

The frozen VAE is ``configs/vae_tiny.py``'s architecture: ``vae.init_from`` names a trained one (a
trainer run of that config, or its export); the train command refuses an empty one (``random``
runs on a random VAE, for smoke tests only). Video is 32x32 at 8 fps, 17 frames; every example has its
own timeline (``train.timelines="per_example"``: keyframes anywhere, at shot starts, extensions, drawn
by ``data.tasks``), latents encoded in the step, rows padded to one bucket of 11 latent frames. The
text encoder is a tiny umT5 (d_model 32, so text_dim 32); the walkthrough trains without captions
(``text.conditioning=False``). Float32 compute: bf16 is slow on CPUs and the tests compare meshes at 1e-5.
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

    # configs/vae_tiny.py's VAE (the demo's): Wan2.1's blocks at base width 16, 4x spatial compression.
    c.vae.update(dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
                      temperal_downsample=(True, True)))

    # 2000 steps: ~12 min on 2 CPU cores (the frozen VAE encodes every clip in the step)
    c.train.update(dict(steps=2000, batch_size=8, log_every=10, keyframes=(0, 16), latents="encode",
                        timelines="per_example"))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=10, ema_decay=0.99))
    c.checkpoint.update(dict(every=500, keep_last=2, keep_every=0))
    c.data.synthetic.fps = c.video.fps
    return c
