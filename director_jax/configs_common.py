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
    c.model_options = ml_collections.ConfigDict(dict(
        dtype="bfloat16", param_dtype="float32", attention_impl="auto", remat_policy="dots_saveable"))

    c.video = ml_collections.ConfigDict(dict(height=height, width=width, num_frames=81, fps=16.0))
    c.text = ml_collections.ConfigDict(dict(max_length=512))

    # Flow matching: t ~ logit-normal, then shifted toward noise for larger token counts.
    c.flow = ml_collections.ConfigDict(dict(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0,
                                            shift=shift))
    c.sampler = ml_collections.ConfigDict(dict(name="unipc", steps=50, shift=shift, guidance_scale=5.0,
                                               negative_prompt=""))
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


def dit_config(model: ml_collections.ConfigDict) -> WanDiTConfig:
    """The ``model`` section of a config as a WanDiTConfig."""
    return WanDiTConfig.from_diffusers_config(model.to_dict())


def build_director_gen(cfg: ml_collections.ConfigDict, *, seed: int | None = None):
    """Director-Gen as the config says: random init, or ``cfg.init_from`` (any Wan2.1 T2V checkpoint)."""
    import jax.numpy as jnp
    from flax import nnx

    from director_jax.convert.dit import load_transformer
    from director_jax.models.dit import DirectorGen, WanDiT

    opts = cfg.model_options
    kw = dict(dtype=jnp.dtype(opts.dtype), param_dtype=jnp.dtype(opts.param_dtype),
              attention_impl=opts.attention_impl, remat_policy=opts.remat_policy)
    model_cfg = dit_config(cfg.model)
    if cfg.init_from:
        dit = load_transformer(cfg.init_from, **kw)
        if dit.config != model_cfg:
            raise ValueError(f"{cfg.init_from} holds a transformer with config {dit.config}, but the run's config "
                             f"says {model_cfg}: fix --config.model.* or pick the matching checkpoint.")
    else:
        dit = WanDiT(model_cfg, rngs=nnx.Rngs(cfg.seed if seed is None else seed), **kw)
    return DirectorGen(dit)
