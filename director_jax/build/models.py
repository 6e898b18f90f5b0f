"""Config -> models: the builders every command, the trainer and the evaluation use.

The builders (``build_vae``, ``build_director_gen``, ``build_director_sr``, ``random_frozen_vae``)
turn a config (``configs/*.py``) into a model; they are traceable, so the trainer calls them under
``nnx.eval_shape`` and ``jax.jit`` for a sharded initialisation. ``model_options`` is the one map
from ``config.model_options`` to module arguments. The frozen VAE of a Director-Gen / SR config is
``vae.init_from`` read with its own latent statistics (``vae_config_with_checkpoint_stats``), else
the trainer's random initialisation. ``vae.init_from`` and ``init_from`` may also name a training run
of this project (a workdir, its checkpoints/ or one step: ``reuse``). Inside ``shard_init.deferred_init_from()``
(the trainer's traced init) the Gen / SR builders read no ``init_from``: the trainer loads it into the shards.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from director_jax.build.reuse import is_trainer_run, read_trainer_vae, trainer_director_gen, trainer_director_sr
from director_jax.build.sections import architecture_differences, dit_config, model_options, vae_config_from
from director_jax.build.shard_init import check_gen_source, defer, sr_starts_from_gen
from director_jax.convert.dit import load_transformer
from director_jax.convert.vae import load_vae, vae_config
from director_jax.models.dit import DirectorGen, WanDiT
from director_jax.models.sr import DirectorSR
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.models.vae_init import initialise_for_fit

log = logging.getLogger(__name__)

RANDOM_VAE = "random"  # vae.init_from for smoke tests: the randomly initialised frozen VAE, asked for on purpose

# ------------------------------------------------------------------------------------------------
# Config -> model


def vae_config_with_checkpoint_stats(section: ml_collections.ConfigDict) -> WanVAEConfig:
    """``config.vae`` as a WanVAEConfig, with the latent statistics ``init_from`` records, where it records any.

    A VAE fitted here (the CPU demo's, ``benchmarks/sr.py``'s, a VAE training run's) has its own
    latent scale; normalising with other statistics mis-scales every latent (Director-Gen once got
    keyframes normalised ~2x off this way). A diffusers directory records them in its config.json, a
    VAE training run in its checkpoints (the running statistics of its posterior means). The
    architecture fields must agree with ``config.vae`` (they fix the shapes the step is compiled
    for). For the Wan2.1 VAE the directory's statistics are the defaults, so nothing changes.
    """
    config = vae_config_from(section)
    src = section.get("init_from", "")
    if src == RANDOM_VAE:
        return config
    if src and is_trainer_run(src):
        return read_trainer_vae(src, config, with_weights=False, source=f"config.vae.init_from={src}").config
    config_json = next((p for p in (Path(src) / "config.json", Path(src) / "vae" / "config.json")
                        if src and p.is_file()), None)
    if config_json is None:
        return config
    saved = vae_config(config_json)
    differ = architecture_differences(saved, config)
    if differ:
        raise ValueError(f"{config_json} describes another VAE than config.vae: {differ}. Set --config.vae.<field> "
                         "to the checkpoint's values.")
    return dataclasses.replace(config, latents_mean=saved.latents_mean, latents_std=saved.latents_std)


def build_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The trainable VAE of a VAE run (``config.task = "vae"``), randomly initialised from ``cfg.seed`` (and
    ``cfg.vae_init``'s kernel scale and inflation, for short fits from scratch)."""
    opts = cfg.model_options
    vae = WanVAE(vae_config_from(cfg.vae), rngs=nnx.Rngs(int(cfg.seed)), dtype=jnp.dtype(opts.dtype),
                 param_dtype=jnp.dtype(opts.param_dtype))
    init = cfg.get("vae_init") or {}  # configs/vae_tiny.py: kernel_scale, inflate (models/vae_init.py)
    return initialise_for_fit(vae, kernel_scale=float(init.get("kernel_scale", 1.0)),
                              inflate=bool(init.get("inflate", False)))


def build_director_gen(cfg: ml_collections.ConfigDict, *, seed: int | None = None) -> DirectorGen:
    """Director-Gen as the config says: random init, or ``cfg.init_from``: any Wan2.1 T2V checkpoint, or a
    Director-Gen training run (its EMA weights where it kept them), to continue or fine-tune from."""
    kw = model_options(cfg)
    model_cfg = dit_config(cfg.model)
    deferred = defer(cfg.init_from, "gen", model_cfg)  # the trainer's init: read later, into the shards
    if cfg.init_from and not deferred and is_trainer_run(cfg.init_from):
        return trainer_director_gen(cfg.init_from, model_cfg, kw)
    if cfg.init_from and not deferred:
        dit = load_transformer(cfg.init_from, **kw)
        check_gen_source(cfg.init_from, dit.config, model_cfg)
    else:
        dit = WanDiT(model_cfg, rngs=nnx.Rngs(cfg.seed if seed is None else seed), **kw)
    return DirectorGen(dit)


def build_director_sr(cfg: ml_collections.ConfigDict) -> DirectorSR:
    """Director-SR for the Gen architecture of ``cfg.model``: random, from a Gen checkpoint, or an SR checkpoint.

    ``cfg.init_from`` may hold a Director-Gen / Wan T2V transformer (the SR model starts as it, the
    low-res channels zero: ``DirectorSR.from_gen``) or an SR transformer (``convert.sr.export_sr``;
    training continues from it), as weights or as a training run (a Gen or an SR run). Empty:
    ``DirectorSR.init`` with ``cfg.seed``.
    """
    kw = model_options(cfg)
    gen_cfg = dit_config(cfg.model)
    if not cfg.init_from or defer(cfg.init_from, "sr", gen_cfg):  # deferred: the trainer fills it in its shards
        return DirectorSR.init(gen_cfg, rngs=nnx.Rngs(int(cfg.seed)), **kw)
    if is_trainer_run(cfg.init_from):
        return trainer_director_sr(cfg.init_from, gen_cfg, kw)
    dit = load_transformer(cfg.init_from, **kw)
    return DirectorSR.from_gen(dit) if sr_starts_from_gen(cfg.init_from, dit.config, gen_cfg) else DirectorSR(dit)


def random_frozen_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The frozen VAE of a Gen / SR config with random weights (seed ``cfg.seed + 1``): shapes, tests."""
    return WanVAE(vae_config_with_checkpoint_stats(cfg.vae), rngs=nnx.Rngs(int(cfg.seed) + 1))


def frozen_vae(cfg: ml_collections.ConfigDict) -> WanVAE:
    """The frozen VAE a Gen / SR run encodes with: ``vae.init_from`` with its own latent statistics, else random.

    ``vae.init_from`` is weights (a diffusers directory, a weight file) or a VAE training run (its EMA
    weights where it kept them, else its parameters, and its running latent statistics); ``"random"``
    (``RANDOM_VAE``) asks for the random initialisation on purpose (smoke tests), without the warning.
    """
    src = cfg.vae.init_from
    if src == RANDOM_VAE:
        return random_frozen_vae(cfg)
    if src and is_trainer_run(src):
        trained = read_trainer_vae(src, vae_config_from(cfg.vae), source=f"config.vae.init_from={src}")
        log.info("frozen VAE: the %s weights of step %d of the VAE run %s (pass a step directory to pin one).",
                 trained.loaded.weights, trained.loaded.step, src)
        return trained.vae
    if src:
        return load_vae(cfg.vae.init_from, vae_config_with_checkpoint_stats(cfg.vae))
    log.warning("config.vae.init_from is empty: the VAE is randomly initialised (fine for tests; set "
                "--config.vae.init_from to a Wan2.1 VAE for real runs).")
    return random_frozen_vae(cfg)


def load_frozen_vae(model_cfg: ml_collections.ConfigDict, *, sharding: jax.sharding.Sharding) -> WanVAE:
    """The frozen VAE of a trained Gen / SR config for inference, placed on ``sharding``.

    ``vae.init_from``, or for runs that encoded in the step with an empty ``init_from`` the trainer's
    own random initialisation; a run trained on precomputed latents must name their VAE.
    """
    if not model_cfg.vae.init_from and model_cfg.train.get("latents") != "encode":
        raise ValueError("the model config's vae.init_from is empty and its run trained on precomputed latents: set "
                         "vae.init_from in the model config (--config.model_config) to the VAE of those latents.")
    graphdef, state = nnx.split(frozen_vae(model_cfg))
    return nnx.merge(graphdef, jax.device_put(state, sharding))
