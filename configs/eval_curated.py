"""The curated suite: keyframe timelines on held-out clips of real footage (a curated directory's shards).

    python -m director_jax.evaluate --suite curated --data CURATED_DIR --ckpt runs/gen --workdir runs/eval_curated
    python -m director_jax.evaluate --config configs/eval_curated.py --config.data CURATED_DIR --ckpt runs/gen \\
        --config.max_clips 128 --config.split all --workdir runs/eval_curated
    # the same cases for another checkpoint (or after clips were added to the data):
    python -m director_jax.evaluate --config configs/eval_curated.py --config.data CURATED_DIR --ckpt runs/gen2 \\
        --config.cases_file runs/eval_curated/cases.json --workdir runs/eval_curated_gen2
    python -m director_jax.evaluate compare runs/eval_curated runs/eval_curated_gen2 --workdir runs/compare

``data`` is a curated directory built into shards (``python -m director_jax.shards --curated DIR``), its
``tfds/`` or the dataset version directory. Each case is a window of a held-out clip at the model's
size, fps and clip length: around a cut with keyframes at the shot starts, or with 1 to
``max_keyframes`` keyframes at drawn frames (``eval/curated.py`` says how, exactly). Case ``i`` is
generated from the noise of ``fold_in(key(seed), i)``; the draw of clip X's window uses
``sha256(f"{seed}:{X}")``.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.suite = "curated"
    c.data = ""  # the curated directory (built into shards), its tfds/ or the dataset version dir
    c.split = "validation"  # "validation", "train" or "all"
    c.max_clips = 32  # the first clips by id that are long enough; shorter ones are counted in metrics.json's skipped
    c.frames = 0  # case length in frames at the model's fps (0: the model's video.num_frames)
    c.min_keyframes = 1  # single-shot windows draw this many to max_keyframes keyframes
    c.max_keyframes = 3
    c.cases_file = ""  # a run's cases.json: evaluate exactly those cases (clips, windows, keyframes)
    c.model_config = ""  # "": the evaluated run's own config; or a config file / trainer run (a baseline needs one)
    c.allow_config_mismatch = False
    c.weights = "auto"  # "auto": EMA when the checkpoint has it, else the raw parameters; or "ema" / "params"
    c.sampler = ml_collections.ConfigDict(dict(name=placeholder(str), steps=placeholder(int),
                                               shift=placeholder(float), guidance_scale=placeholder(float),
                                               keyframe_guidance=placeholder(float)))
    c.text_cache = ""  # caption embeddings for text-conditioned models (data/text_embeddings.py)
    c.text_encoder = ""  # or the umT5 encoder (a Wan diffusers / official release): captions embedded in JAX
    c.text_dtype = "bfloat16"
    c.cases_per_device = 1
    c.mesh = "data"  # or model axes ("fsdp=4", "fsdp=2,tensor=2"): see configs/eval_synthetic.py
    c.dtype = "float32"
    # FVD: Kinetics-400 I3D logits of the first fvd_frames frames at fvd_size px (16 and 224 are the standard), with a
    # bootstrap interval; cut detection: PySceneDetect's content detector on the generated frames.
    # FVD: Kinetics-400 I3D logits of the first fvd_frames frames at fvd_size px (16 and 224 are the standard), with a
    # percentile bootstrap interval over fvd_bootstrap resamples and a warning below fvd_min_clips clips. Cuts:
    # PySceneDetect's detector on the generated frames ("content" or "adaptive"; threshold 0: its default), a
    # detection within cut_tolerance frames of a requested cut matches it.
    c.metrics = ml_collections.ConfigDict(dict(lpips_net="alexnet", fvd=True, fvd_frames=16, fvd_size=224,
                                               fvd_layer="logits", fvd_bootstrap=200, fvd_min_clips=256,
                                               cut_detector="content", cut_threshold=0.0, cut_tolerance=2))
    c.report = ml_collections.ConfigDict(dict(media_cases=6))
    c.max_suite_gib = 4.0
    return c
