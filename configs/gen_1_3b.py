"""Director-Gen at Wan2.1 T2V 1.3B size (dim 1536, 12 heads, 30 layers, FFN 8960), 480p, 81 frames.

    python -m director_jax.train --config configs/gen_1_3b.py --workdir gs://BUCKET/runs/gen_1_3b
    python -m director_jax.train --config configs/gen_1_3b.py --config.model.num_layers 2 ...

Start from the released weights with --config.init_from /path/to/Wan2.1-T2V-1.3B (official or
diffusers layout; see director_jax.convert.load_transformer).
"""

import ml_collections

from director_jax.configs_common import gen_config


def get_config() -> ml_collections.ConfigDict:
    return gen_config(dim=1536, heads=12, layers=30, ffn=8960, height=480, width=832, shift=3.0)
