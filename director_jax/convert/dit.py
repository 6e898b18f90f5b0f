"""Loading the Wan2.1 T2V transformer from any supported checkpoint, and exporting it for diffusers.

``load_transformer(src)`` takes a diffusers directory or pipeline directory (``transformer/``), a
released Wan2.1 repository (official names, official ``config.json``, sharded safetensors), a
single ``.safetensors`` / index / ``.pth`` file in either layout, or a state dict with a config.
Every key must fit: missing, unexpected and mis-shaped keys raise ``WeightMismatchError`` in the
file's own naming. ``export_transformer`` writes a diffusers directory (sharded above 10 GB) that
``WanTransformer3DModel.from_pretrained`` loads with no missing or unexpected keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.convert.checkpoint import Checkpoint, ModelFormat, parse_config, read_checkpoint
from director_jax.convert.dit_weights import (
    OFFICIAL_PREFIXES,
    config_from_official,
    diffusers_param_table,
    looks_official,
    official_key_map,
)
from director_jax.convert.param_table import export_state_dict, load_state_dict
from director_jax.convert.state_dict import DEFAULT_MAX_SHARD_BYTES, check_state_dict, write_diffusers_dir
from director_jax.models.dit import WanDiT, WanDiTConfig

DIFFUSERS_CLASS = "WanTransformer3DModel"

TRANSFORMER_FORMAT = ModelFormat(
    name="transformer",
    diffusers_class=DIFFUSERS_CLASS,
    pipeline_subfolder="transformer",
    config_type=WanDiTConfig,
    parse_config=WanDiTConfig.from_diffusers_config,
    looks_official=looks_official,
    official_config=config_from_official,
    extra_config_keys=frozenset({"window_size"}),  # older diffusers configs; Wan2.1 uses global attention
    strip_prefixes=OFFICIAL_PREFIXES,
)

ConfigLike = WanDiTConfig | Mapping[str, Any] | str | os.PathLike


def transformer_config(config: ConfigLike) -> WanDiTConfig:
    """A WanDiTConfig from a WanDiTConfig, a diffusers config dict, or a path to a config.json."""
    return parse_config(TRANSFORMER_FORMAT, config)


def read_transformer_checkpoint(src: str | os.PathLike | Mapping[str, Any],
                                config: ConfigLike | None = None, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Reads transformer weights and their config (see ``director_jax.convert.checkpoint``)."""
    return read_checkpoint(TRANSFORMER_FORMAT, src, config, allow_nonfinite=allow_nonfinite)


def empty_transformer(config: WanDiTConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      **model_kw: Any) -> WanDiT:
    """The DiT with abstract parameters (shapes only): nothing is drawn only to be overwritten."""
    return nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                         **model_kw))


def transformer_from_checkpoint(ckpt: Checkpoint, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                                **model_kw: Any) -> WanDiT:
    """Builds the DiT for ``ckpt.config`` and loads the weights; every key must fit exactly."""
    model = empty_transformer(ckpt.config, dtype=dtype, param_dtype=param_dtype or dtype, **model_kw)
    table = diffusers_param_table(model)
    state = ckpt.state
    if ckpt.layout == "official":
        names = official_key_map(model)
        check_state_dict({names[k]: e.torch_shape for k, e in table.items()}, state,
                         f"{ckpt.source} (official Wan2.1 layout)")
        inverse = {v: k for k, v in names.items()}
        state = {inverse[k]: v for k, v in state.items()}
    load_state_dict(model, table, state, ckpt.source)
    abstract = [x for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.ShapeDtypeStruct)]
    assert not abstract, f"{len(abstract)} transformer variables were left unset by the checkpoint"
    return model


def load_transformer(src: str | os.PathLike | Mapping[str, Any], config: ConfigLike | None = None, *,
                     dtype: Any = jnp.float32, param_dtype: Any = None, allow_nonfinite: bool = False,
                     **model_kw: Any) -> WanDiT:
    """The Wan2.1 T2V DiT with the weights of ``src`` (see the module docstring for the sources).

    ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``) that of the parameters;
    ``model_kw`` go to ``WanDiT`` (``attention_impl``, ``remat_policy``). NaN / infinite weights raise a
    ValueError unless ``allow_nonfinite``.
    """
    ckpt = read_transformer_checkpoint(src, config, allow_nonfinite=allow_nonfinite)
    return transformer_from_checkpoint(ckpt, dtype=dtype, param_dtype=param_dtype, **model_kw)


def export_transformer(model: WanDiT, out_dir: str | os.PathLike, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str = "float32") -> Path:
    """Writes ``model`` as a diffusers WanTransformer3DModel directory (float32 or bfloat16 safetensors)."""
    state = export_state_dict(model, diffusers_param_table(model))
    return write_diffusers_dir(out_dir, model.config.to_diffusers_config(), state, DIFFUSERS_CLASS,
                               max_shard_bytes=max_shard_bytes, dtype=dtype)


def parameter_count(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
