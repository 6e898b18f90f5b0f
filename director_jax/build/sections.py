"""Config sections -> model configs: ``config.model`` (a WanDiTConfig), ``config.vae`` (a WanVAEConfig) and
``config.model_options`` (module arguments), for a run's own config or the one a trainer checkpoint recorded.

``architecture_differences`` names the fields in which two configs disagree, for one-line errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from director_jax.models.dit import WanDiTConfig
from director_jax.models.vae import WanVAEConfig

LATENT_STATS_FIELDS = ("latents_mean", "latents_std")  # a VAE's latent scale: not its architecture


def _as_dict(section: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    return section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)


def model_options(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.model_options`` as DiT keyword arguments (numerics, attention, remat, sequence parallelism)."""
    opts = cfg.model_options
    return dict(dtype=jnp.dtype(opts.dtype), param_dtype=jnp.dtype(opts.param_dtype),
                attention_impl=opts.attention_impl, remat_policy=opts.remat_policy,
                sequence_parallel=opts.get("sequence_parallel"),
                attention_block_sizes=opts.get("attention_block_sizes"), scan_unroll=opts.get("scan_unroll", 1))


def dit_config(model: ml_collections.ConfigDict | Mapping[str, Any]) -> WanDiTConfig:
    """The ``model`` section of a config (diffusers' ``WanTransformer3DModel`` arguments) as a WanDiTConfig."""
    return WanDiTConfig.from_diffusers_config(_as_dict(model))


def vae_config_from(section: ml_collections.ConfigDict | Mapping[str, Any]) -> WanVAEConfig:
    """``config.vae`` (WanVAEConfig fields, plus ``init_from``) as a WanVAEConfig."""
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    values = {k: v for k, v in _as_dict(section).items() if k != "init_from"}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config.vae has unknown keys {unknown}; WanVAEConfig fields are {sorted(fields)}.")
    return WanVAEConfig(**values)


def architecture_differences(saved: Any, given: Any, skip: Iterable[str] = LATENT_STATS_FIELDS) -> str:
    """``"base_dim=32 (config: 16), z_dim=8 (config: 16)"`` for the fields of two config dataclasses that differ
    (``skip``: fields that are not architecture); empty when they agree."""
    skipped = set(skip)
    return ", ".join(f"{f.name}={getattr(saved, f.name)!r} (config: {getattr(given, f.name)!r})"
                     for f in dataclasses.fields(saved)
                     if f.name not in skipped and getattr(saved, f.name) != getattr(given, f.name))
