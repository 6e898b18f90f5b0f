"""The synthetic evaluation suite: keyframe timelines on held-out synthetic movies with known trajectories.

    python -m director_jax.evaluate --config configs/eval_synthetic.py --ckpt runs/gen_tiny --workdir runs/eval
    python -m director_jax.evaluate --config configs/eval_synthetic.py --baseline crossfade --workdir runs/eval_xfade
    python -m director_jax.evaluate --config configs/eval_synthetic.py --ckpt runs/gen_tiny \\
        --config.movies.count 16 --config.sampler.steps 50

Every template in ``cases`` is applied to each of ``movies.count`` movies (seeds ``first_seed + i``,
one shape per shot so the trajectory error is exact); keyframe times are seconds ("1s", 1.0) or
frame indices ("#8") at the model config's fps. Clip size, fps and default length come from
``model_config`` (the config the checkpoint was trained with, which also names the frozen VAE).
Case ``i`` is generated from the noise of ``fold_in(key(seed), i)``.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.suite = "synthetic"
    c.model_config = ""  # "": the evaluated run's own config; or a config file / trainer run (a baseline needs one)
    c.allow_config_mismatch = False  # True: evaluate with model_config even where it differs from the checkpoint's
    c.weights = "auto"  # "auto": EMA when the checkpoint has it, else the raw parameters; or "ema" / "params"
    c.movies = ml_collections.ConfigDict(dict(count=4, first_seed=7_000_000, shot_lengths=(24, 24), max_shapes=1))
    c.cases = (
        dict(name="first and last keyframe", keyframes=("#0", "#16")),
        dict(name="three keyframes at 0, 1, 2 s", keyframes=("0s", "1s", "2s")),
        # the clip starts 8 frames before the movie's cut: one keyframe per shot
        dict(name="keyframe per shot", anchor="cut", start=-8, keyframes=("#0", "#8")),
    )
    # Sampling: unset fields take the model config's sampler section (keyframe_guidance: 1 = off).
    c.sampler = ml_collections.ConfigDict(dict(name=placeholder(str), steps=placeholder(int),
                                               shift=placeholder(float), guidance_scale=placeholder(float),
                                               keyframe_guidance=placeholder(float)))
    c.text_cache = ""  # caption embeddings for text-conditioned models (data/text_embeddings.py)
    c.text_encoder = ""  # or the umT5 encoder (a Wan diffusers / official release): captions embedded in JAX
    c.text_dtype = "bfloat16"  # the text encoder's precision
    c.cases_per_device = 1  # cases each device generates at once (fixed, so results do not depend on device count)
    # "data": each device holds the whole model and generates its own cases; model axes ("fsdp=4", "fsdp=2,tensor=2",
    # "fsdp=2,sequence=2") shard the model over groups of that many devices (a 14B model), the groups on "data".
    c.mesh = "data"
    c.dtype = "float32"  # the model's weights and compute ("bfloat16" halves the memory; numbers move by rounding)
    # FVD: Kinetics-400 I3D logits of the first fvd_frames frames at fvd_size px (16 and 224 are the standard).
    # FVD: Kinetics-400 I3D logits of the first fvd_frames frames at fvd_size px (16 and 224 are the standard), with a
    # percentile bootstrap interval over fvd_bootstrap resamples and a warning below fvd_min_clips clips. Cuts:
    # PySceneDetect's detector on the generated frames ("content" or "adaptive"; threshold 0: its default), a
    # detection within cut_tolerance frames of a requested cut matches it.
    c.metrics = ml_collections.ConfigDict(dict(lpips_net="alexnet", fvd=True, fvd_frames=16, fvd_size=224,
                                               fvd_layer="logits", fvd_bootstrap=200, fvd_min_clips=256,
                                               cut_detector="content", cut_threshold=0.0, cut_tolerance=2))
    c.report = ml_collections.ConfigDict(dict(media_cases=6))
    c.max_suite_gib = 4.0  # host memory for the suite's clips (references + generated, float32); checked up front
    return c
