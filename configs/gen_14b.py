"""Director-Gen at Wan2.1 T2V 14B size (dim 5120, 40 heads, 40 layers, FFN 13824), 720p, 81 frames.

    python -m director_jax.train --config configs/gen_14b.py --workdir gs://BUCKET/runs/gen_14b

Start from the released weights with --config.init_from /path/to/Wan2.1-T2V-14B.
"""

import ml_collections

from director_jax.configs_common import gen_config


def get_config() -> ml_collections.ConfigDict:
    return gen_config(dim=5120, heads=40, layers=40, ffn=13824, height=720, width=1280, shift=5.0)
