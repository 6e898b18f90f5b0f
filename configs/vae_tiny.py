"""The Wan2.1 VAE at toy width (the CPU demo's), trained on synthetic movies: L1 + KL on 5-frame clips.

    python -m director_jax.train --config configs/vae_tiny.py --workdir runs/vae_tiny
"""

import ml_collections

from director_jax.configs_common import add_training


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.vae = ml_collections.ConfigDict(dict(base_dim=16, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                           attn_scales=(), temperal_downsample=(False, True, True), init_from=""))
    c.model_options = ml_collections.ConfigDict(dict(dtype="float32", param_dtype="float32"))
    c.video = ml_collections.ConfigDict(dict(height=32, width=32, num_frames=5, fps=8.0))
    add_training(c, task="vae", batch_size=4, steps=400, learning_rate=2e-3, warmup_steps=20)
    c.optim.update(dict(weight_decay=1e-4, ema_decay=0.0))
    c.checkpoint.update(dict(every=100, keep_last=2))
    c.data.synthetic.fps = c.video.fps
    return c
