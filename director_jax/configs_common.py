"""Builders shared by the files in ``configs/`` (each file is a short ``get_config()`` on top).

Field names under ``model`` are diffusers' ``WanTransformer3DModel`` arguments, so a config can be
compared with (or filled from) a released checkpoint's config.json as it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import ml_collections

from director_jax.models.dit import WanDiTConfig


def gen_config(*, dim: int, heads: int, layers: int, ffn: int, height: int, width: int,
               shift: float) -> ml_collections.ConfigDict:
    """A Director-Gen config: the DiT, its numerics, flow-matching training and sampling settings."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a Wan2.1 T2V checkpoint to start from ("" = random init)

    model = dataclasses.asdict(WanDiTConfig(num_attention_heads=heads, attention_head_dim=dim // heads,
                                            ffn_dim=ffn, num_layers=layers))
    model["patch_size"] = tuple(model["patch_size"])
    c.model = ml_collections.ConfigDict(model)
    # sequence_parallel: None, "ulysses", "ring" or "auto"; "ulysses" / "ring" need mesh.sequence > 1, "auto" runs
    # local attention without one (a placeholder, so --config.model_options.sequence_parallel=ring works from the
    # command line).
    c.model_options = ml_collections.ConfigDict(dict(
        dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat_policy="dots_saveable",
        sequence_parallel=ml_collections.config_dict.placeholder(str),
        # flash-kernel tiles, e.g. {block_q: 512, block_kv: 1024, block_q_bwd: 512, block_kv_bwd: 512}; None: the
        # chip's entry of kernels/flash.py:DEFAULT_BLOCK_SIZES
        attention_block_sizes=ml_collections.config_dict.placeholder(dict),
        # blocks per loop iteration of the layer scan; True: no loop (longer compiles; the compiler's FLOP count
        # of an unrolled step is exact, benchmarks/aot_train.py --hardware-flops)
        scan_unroll=1))

    c.video = ml_collections.ConfigDict(dict(height=height, width=width, num_frames=81, fps=16.0))
    c.text = ml_collections.ConfigDict(dict(max_length=512, conditioning=True))

    # Flow matching: t ~ logit-normal, then shifted toward noise for larger token counts.
    c.flow = ml_collections.ConfigDict(dict(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                                            shift=shift))
    # keyframe_guidance > 1 needs a model trained with train.keyframe_dropout > 0 (diffusion/samplers.py)
    c.sampler = ml_collections.ConfigDict(dict(name="unipc", steps=50, shift=shift, guidance_scale=5.0,
                                               keyframe_guidance=1.0, negative_prompt=""))
    c.vae = ml_collections.ConfigDict(dict(init_from=""))  # the frozen Wan2.1 VAE (architecture defaults)
    add_training(c, task="gen", batch_size=1, steps=10_000, learning_rate=1e-5, warmup_steps=500)
    c.train.keyframes = (0,)  # frames of the training timeline held clean (keyframes), with timelines="fixed"
    # "per_example": every example its own task and keyframes (data.tasks), what teaches pacing control; rows are
    # padded to the smallest of latent_buckets (latent frame counts; () = one, the longest timeline's) holding them
    c.train.timelines = "fixed"
    c.train.latent_buckets = ()
    c.train.max_chunks = 0  # chunks a timeline may have (0: data.tasks.max_keyframes + 1, at least 3)
    c.train.latents = "precomputed"  # "encode": the frozen VAE encodes pixels inside the step
    return c


def add_training(c: ml_collections.ConfigDict, *, task: str, batch_size: int, steps: int, learning_rate: float,
                 warmup_steps: int) -> ml_collections.ConfigDict:
    """The trainer's sections: task, mesh, train loop, optimizer, checkpoints, data source."""
    c.task = task
    # Mesh axis sizes per slice (-1 = the rest of the devices) and across slices (dcn_*). rules: the
    # logical-axis rules, None for parallel/rules.py:DEFAULT_RULES, else [logical_name, mesh_axes] pairs
    # that replace those names' default rules, e.g. [["embed", "tensor"]] (command line: a tuple literal,
    # --config.mesh.rules="(('embed', None),)"); checked by parallel.rules.rules_from_config.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1,
                                            dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_sequence=1,
                                            rules=ml_collections.config_dict.placeholder(tuple)))
    c.train = ml_collections.ConfigDict(dict(
        steps=steps,
        batch_size=batch_size,  # global, over all hosts
        micro_batches=1,  # gradient accumulation: the batch is split into this many sequential micro-batches
        log_every=10,
        nonfinite="stop",  # "stop": save diagnostics and stop; "skip": leave the state unchanged, count the skip
        kl_weight=1e-6,  # VAE task
        sample_posterior=False,  # VAE task: decode a posterior sample (True) or the mean (False)
        lpips_weight=0.0,  # VAE task: weight of the LPIPS (AlexNet) perceptual term; 0 = L1 + KL only
        mse_weight=0.0,  # VAE task: weight of the mean squared error (L1's gradient does not shrink with the error)
        anchor_weight=0.0,  # VAE task: weight of train/losses.py:temporal_anchor_loss (multi-frame clips)
    ))
    # moment_dtype / ema_dtype: None (the parameters' dtype), "float32" or "bfloat16" (train/optim.py); with
    # model_options.param_dtype they make the precision recipe (benchmarks/RESULTS.md, "Precision recipes");
    # ema_memory: "device" or "host" (the EMA kept in the hosts' memory, not HBM; updated on the chips each step)
    c.optim = ml_collections.ConfigDict(dict(learning_rate=learning_rate, warmup_steps=warmup_steps, decay_steps=0,
                                             end_lr_ratio=0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                             grad_clip=1.0, ema_decay=0.999,
                                             moment_dtype=ml_collections.config_dict.placeholder(str),
                                             ema_dtype=ml_collections.config_dict.placeholder(str),
                                             ema_memory="device"))
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep_last=3, keep_every=0, async_save=True))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # "synthetic" (generated on the fly) or "curated" (the TFDS shards of data/shards.py)
        worker_count=0,
        synthetic=ml_collections.ConfigDict(dict(num_movies=100_000, fps=8.0, shot_lengths=(20, 28),
                                                 shots_per_movie=2, hflip=True)),
        # data/loader.py: windows of video.num_frames frames, resized and cropped to video.height x width
        curated=ml_collections.ConfigDict(dict(
            dir="",  # the curated directory (with tfds/ inside), its tfds/ dir or the dataset version dir
            split="train",
            fps=0.0,  # resample the clips to this rate; 0 keeps each clip's own
            caption_dropout=0.1,  # the probability that a caption becomes "" (classifier-free guidance)
            decode_threads=1,  # FFmpeg threads per decode; parallelism comes from data.worker_count
        )),
        # a latent cache (data.source="latents"): python -m director_jax.encode --cache_dir DIR
        latents=ml_collections.ConfigDict(dict(dir="")),
        # per-example timelines (train.timelines="per_example"): each example's task and keyframes, drawn by the
        # data source from its window's cuts (data/task_sampling.py)
        tasks=ml_collections.ConfigDict(dict(
            task_weights=dict(single_shot=0.4, multi_shot=0.3, extend_forward=0.1, extend_backward=0.1,
                              in_between=0.1),
            max_keyframes=4, keyframe_first=0.5, keyframe_middle=0.25, keyframe_last=0.5, min_span=2,
            cuts_keyframed=False)),  # True: a window holding a cut takes multi_shot only
    ))
    return c


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, as ``--config path`` gives it to the commands (for code and tests)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
