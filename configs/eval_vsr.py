"""Video super-resolution benchmarks (UDM10, SPMCS, Vid4, REDS4, YouHQ40) for Director-SR, with and without anchors.

    python -m director_jax.evaluate --suite vsr --data data/Vid4 --config.lr_dir BIx4 --ckpt runs/sr \\
        --workdir runs/eval_vid4
    python -m director_jax.evaluate --suite vsr --data data/SPMCS --baseline bicubic --config.model_config runs/sr \\
        --workdir runs/eval_spmcs_bicubic
    python -m director_jax.evaluate --suite vsr --data data/REDS --config.hr_dir train_sharp \\
        --config.lr_dir train_sharp_bicubic/X4 --config.sequences '("000","011","015","020")' \\
        --ckpt runs/sr --config.tile 32 --workdir runs/eval_reds4

Folder layouts and the BI degradation (used where no LR frames are given): ``eval/vsr_data.py``;
the metrics (BasicSR's PSNR-Y / SSIM-Y with ``crop_border`` = scale, PSNR-RGB, LPIPS): ``eval/vsr.py``.
Each window of ``frames`` frames is super-resolved twice from the noise of ``fold_in(key(seed), window)``:
without anchors (``model``) and with the HR frames at ``anchors`` held clean (``model_anchored``, scored on
the other frames); the bicubic upsampling of the LR frames (``bicubic``) is scored in the same run.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.suite = "vsr"
    c.data = ""  # the benchmark folder (required)
    c.hr_dir = ""  # "": GT/HR/gt/hr/truth (or SPMCS's SEQ/truth); else a folder relative to data
    c.lr_dir = ""  # "": the one LR folder found (LR, BIx4, BDx4, input4, ...); name one where there are several
    c.lr_given = True  # use the LR files when present; False: always make LR by the BI degradation
    c.sequences = ()  # only these sequence names (REDS4: ("000", "011", "015", "020")); (): all
    c.scale = 0  # 0: the SR model config's degradation.scales[0]; a baseline without a model config may set it
    c.seed = 0
    c.model_config = ""  # "": the evaluated run's own config; or an SR config file / trainer run
    c.allow_config_mismatch = False  # True: evaluate with model_config even where it differs from the checkpoint's
    c.weights = "auto"  # "auto": EMA when the checkpoint has it, else the raw parameters; or "ema" / "params"
    c.dtype = "float32"  # the model's weights and compute ("bfloat16" halves the memory)
    c.frames = 0  # window length; 0: the SR config's video.num_frames (a baseline without one: whole sequences)
    c.min_frames = 0  # shortest window evaluated (a shorter remainder is skipped and listed); 0: 5, one latent step
    c.max_sequences = 0  # 0: every sequence
    c.max_frames = 0  # first frames of each sequence; 0: all
    # Anchors of each window: "#k" (frame k of the window), "last", "every:N" (frames 0, N, 2N, ...); (): none.
    c.anchors = ("#0", "last")
    # Sampling: unset fields take the SR model config's sampler section.
    c.sampler = ml_collections.ConfigDict(dict(name=placeholder(str), steps=placeholder(int),
                                               shift=placeholder(float)))
    c.tile = 0  # latent pixels per spatial tile (a multiple of the DiT patch); 0: the whole frame at once
    c.tile_overlap = -1  # latent pixels; -1: one DiT patch
    # crop_border -1: the scale (the benchmarks' convention); lpips_net "" skips LPIPS.
    c.metrics = ml_collections.ConfigDict(dict(crop_border=-1, lpips_net="alexnet"))
    c.report = ml_collections.ConfigDict(dict(media_cases=4))  # contact sheets of the first windows
    return c
