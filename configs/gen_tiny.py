"""Director-Gen at toy size for the tests and the CPU demo: Wan's architecture, 2 layers of width 64.

    python -m director_jax.train --config configs/gen_tiny.py --workdir runs/gen_tiny

The text encoder is a tiny random umT5 (d_model 32), so text_dim is 32; video is 32x32 at 8 fps.
"""

import ml_collections

from director_jax.configs_common import gen_config


def get_config() -> ml_collections.ConfigDict:
    c = gen_config(dim=64, heads=2, layers=2, ffn=128, height=32, width=32, shift=1.0)
    c.model.text_dim = 32
    c.model.freq_dim = 64
    c.text.max_length = 64
    c.video.num_frames = 17
    c.video.fps = 8.0
    c.sampler.steps = 20
    c.sampler.guidance_scale = 1.0
    return c
