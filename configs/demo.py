"""The CPU demo: synthetic movies -> curation -> VAE, Director-Gen and Director-SR -> showcase, evaluation, report.

    bash scripts/demo.sh                                   # = python -m director_jax.demo --config configs/demo.py
    python -m director_jax.demo --workdir runs/demo --config.gen.steps 500     # shorter (numbers drop)
    python -m director_jax.demo --workdir runs/demo_quick --quick              # a smoke run (~3 min)

Sizes: movies are 64x64 at 8 fps; Director-Gen works at 32x32 (the movies box-downscaled 2x) on
17-frame clips, Director-SR brings its output back to 64x64 with the 64x64 keyframes as anchors.
The VAE is the Wan2.1 architecture at toy width with 4x spatial compression (two downsampling
stages instead of Wan's three): at 32x32 an 8x VAE leaves a 4x4 latent, which a CPU-minutes fit
cannot decode to the keyframe fidelity the report asks for. Temporal compression is Wan's 4x.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        size=64, fps=8.0, shot_lengths=(24, 40), shots_per_movie=2,
        train_movies=40, train_max_shapes=2,
        heldout_first_seed=7_000_000,  # the evaluation suite's movies (one shape per shot: exact trajectories)
        gen_frames=17, sr_scale=2,
    ))

    # Wan2.1's VAE blocks at base width 16; 4x spatial, 4x temporal; fitted on frames and 17-frame clips.
    c.vae = ml_collections.ConfigDict(dict(
        base_dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(),
        temperal_downsample=(True, True),
        steps=2500, learning_rate=5e-3, init_scale=8.0, mse_weight=1.0, frame_batch=8, crop=32,
        # Every clip_every-th step: clip_batch 17-frame clips as clip_crop crops. The temporal path needs as many
        # clip steps as frame steps: with one 32x32 clip every 4th step, frames late in a chunk decoded at 21 dB
        # and 10% of the objects vanished in the VAE's own round trip; with 4 16x16 clips every 2nd step (same
        # cost per clip step) the round trip keeps every object (0.8 px trajectory error, 25-28 dB per frame).
        clip_every=2, clip_batch=4, clip_crop=16,
        # A latent space Gen can carry keyframes through: temporal taps start as an inflated image VAE
        # (inflate_temporal_kernels) and later latents are kept near their frames' image latents
        # (temporal_anchor_loss). From random 3D kernels neighbouring latents of a near-static clip differed more
        # than random pairs; Gen's trajectory error on the held-out suite went 7.5 -> 6.9 (inflated) -> 4.9 px.
        inflate=True, anchor_weight=0.1,
    ))

    # Every training example's task and keyframes (data/task_sampling.py), for Gen and SR: keyframes on drawn frames
    # (first, middle and last often: the held-out suite asks for those), extensions forward / backward / in between,
    # and in a window that holds a cut a keyframe at each shot start (cuts_keyframed: trained without captions,
    # nothing else could tell Gen where a cut goes). 17-frame windows hold at most one cut, so 3 keyframes suffice.
    c.tasks = ml_collections.ConfigDict(dict(
        task_weights=dict(single_shot=0.7, multi_shot=0.1, extend_forward=0.1, extend_backward=0.1, in_between=0.1),
        max_keyframes=3, keyframe_first=0.7, keyframe_middle=0.5, keyframe_last=0.7, min_span=2, cuts_keyframed=True))

    # Director-Gen: gen_tiny's architecture (2 layers, width 64) at 32x32.
    # Uniform flow timesteps: logit-normal ones rarely train t near 0 (trajectory error 10.3 vs 9.3 px, measured
    # before the latent-statistics fix of train/tasks.py; not re-measured since).
    # Keyframe guidance (diffusion/samplers.py: keyframe_guided_velocity; trained by dropping every keyframe of 10%
    # of the examples): unguided, this Gen lets an object fade into the background midway between two keyframes
    # (8.3% of generated frames lost it, trajectory error 6.3 px); guided at 10, 0.7% (3.1 px vs cross-fade 3.3).
    # Measured: benchmarks/RESULTS.md, "CPU demo".
    # The latent cache (python -m director_jax.encode): timelines_per_clip seeded windows + tasks of each curated clip.
    # Rows are padded to the smallest latent bucket holding a batch's longest row: most batches' longest row has 8
    # latent frames, and on the CPU a step at 10 costs about twice one at 8.
    c.gen = ml_collections.ConfigDict(dict(steps=8000, batch_size=8, learning_rate=1e-3, warmup_steps=100,
                                           ema_decay=0.995, sampler_steps=20, timestep_sampling="uniform",
                                           keyframe_dropout=0.1, keyframe_guidance=10.0, timelines_per_clip=12,
                                           latent_buckets=(7, 8, 10)))
    # Director-SR: sr_tiny's architecture (2 layers, width 128), 2x from 32x32 to 64x64, on its own latent cache
    # (each clip degraded by the SR task's seeded degradations, both encoded).
    c.sr = ml_collections.ConfigDict(dict(steps=600, batch_size=4, learning_rate=1e-3, warmup_steps=50,
                                          ema_decay=0.99, keyframe_dropout=0.25, sampler_steps=4,
                                          timelines_per_clip=2, latent_buckets=(7, 8, 10)))

    # 16 held-out movies (48 cases): with 8 the trajectory error of one Gen moved by >1 px between movie sets.
    # The curated suite: curated_movies more held-out movies (seeds from curated_first_seed) curated like the
    # training ones, evaluate --suite curated on up to curated_clips of their clips (cuts, pacing, distance curves);
    # its FVD (I3D at 224 px: ~50 s of the demo's 20 minutes) is off: the synthetic suite's FVD, with its interval,
    # is the demo's.
    c.eval = ml_collections.ConfigDict(dict(movies=16, fvd=True, curated_movies=8, curated_clips=12, curated_fvd=False,
                                            curated_first_seed=9_000_000))
    c.export = ml_collections.ConfigDict(dict(torch_check=True))  # re-run one showcase video in PyTorch
    return c
