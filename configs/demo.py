"""The CPU demo: synthetic movies -> tiny VAE fit -> multi-chunk timeline round trips -> report.

    python -m director_jax.demo --config configs/demo.py --workdir runs/demo
    python -m director_jax.demo --config configs/demo.py --workdir runs/demo --config.train.steps 50

What it covers today: the causal VAE and the timeline (keyframes on exact frames, MC-RoPE
positions). Director-Gen, Director-SR and evaluation plug into the same run as they land.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.height = 32
    c.data.width = 32
    c.data.fps = 8.0
    c.data.train_movies = 48
    c.data.heldout_movies = 4
    c.data.shot_lengths = (20, 28)  # min, max frames per shot
    c.data.shots_per_movie = 2
    c.data.clip_frames = 5  # training clips (4n+1): a lone first frame, then one 4-frame latent

    # The Wan2.1 architecture at toy width: same blocks, same 8x / 4x compression, 16 channels.
    c.vae = ml_collections.ConfigDict()
    c.vae.base_dim = 16
    c.vae.z_dim = 16
    c.vae.dim_mult = (1, 2, 2, 2)
    c.vae.num_res_blocks = 1
    c.vae.attn_scales = ()
    c.vae.temperal_downsample = (False, True, True)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 400
    c.train.batch_size = 4
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 20
    c.train.sample_posterior = False  # decode the posterior mean: converges in a CPU-sized fit
    c.train.kl_weight = 1e-6
    c.train.log_every = 50
    return c
