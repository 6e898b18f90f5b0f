"""Curation for short, small movies (``python -m director_jax.movies``' synthetic ones: 64x64, 8 fps, 3-5 s shots).

    python -m director_jax.curate --config configs/curate_small.py --input movies --out curated

``configs/curate.py`` with lengths for 8 fps: single-shot samples of at least 17 frames (the tiny
models' clip), multi-shot samples of two shots with at most 16 frames on each side of the cut, and
near-lossless clips (crf 12: the VAE trains on them).
"""

import ml_collections

from director_jax.configs_common import load_config


def get_config() -> ml_collections.ConfigDict:
    c = load_config(__file__.replace("curate_small.py", "curate.py"))
    c.single_shot.min_frames = 17
    c.multi_shot.update(dict(min_frames=17, max_shots=2, max_edge_frames=16))
    c.clip.crf = 12
    return c
