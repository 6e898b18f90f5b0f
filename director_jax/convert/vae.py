"""Loading the Wan2.1 VAE from any supported checkpoint, and exporting it as a diffusers model.

Sources ``load_vae`` takes:

* a diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or a sharded
  index), or a diffusers pipeline directory with a ``vae/`` subfolder;
* a single weight file (``.safetensors``, a ``.safetensors.index.json``, ``.pth``) in the diffusers
  layout or in the official Wan2.1 layout (``Wan2.1_VAE.pth``);
* an in-memory state dict (name -> NumPy array / torch tensor / jax array), with ``config``.

The layout is detected from the key names. Every key must fit the model exactly: missing,
unexpected and mis-shaped keys raise ``WeightMismatchError`` naming them in the file's own layout.
A diffusers directory is the interchange format: ``export_vae`` writes one that
``diffusers.AutoencoderKLWan.from_pretrained`` loads with no missing or unexpected keys.
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
from director_jax.convert.state_dict import check_state_dict, write_diffusers_dir
from director_jax.convert.vae_weights import (
    config_from_official,
    diffusers_param_table,
    export_diffusers_state_dict,
    load_diffusers_state_dict,
    looks_official,
    official_key_map,
    official_to_diffusers,
)
from director_jax.models.vae import WanVAE, WanVAEConfig

DIFFUSERS_CLASS = "AutoencoderKLWan"

ConfigLike = WanVAEConfig | Mapping[str, Any] | str | os.PathLike
VAECheckpoint = Checkpoint


def _official_config(state: Mapping[str, np.ndarray], _beside: Mapping[str, Any] | None) -> WanVAEConfig:
    needed = [k for k in ("encoder.conv1.weight", "conv2.weight") if k not in state]
    if needed:
        raise ValueError(f"cannot infer the VAE config from the official-layout weights: they lack "
                         f"{', '.join(needed)}. Pass the config explicitly (config= / --config).")
    return config_from_official(state)


VAE_FORMAT = ModelFormat(
    name="VAE",
    diffusers_class=DIFFUSERS_CLASS,
    pipeline_subfolder="vae",
    config_type=WanVAEConfig,
    parse_config=WanVAEConfig.from_diffusers_config,
    looks_official=looks_official,
    official_config=_official_config,
    # derived or Wan2.2-only settings; from_diffusers_config rejects the Wan2.2 values
    extra_config_keys=frozenset({"is_residual", "patch_size", "scale_factor_temporal", "scale_factor_spatial"}),
)


def vae_config(config: ConfigLike) -> WanVAEConfig:
    """A WanVAEConfig from a WanVAEConfig, a diffusers config dict, or a path to a config.json."""
    return parse_config(VAE_FORMAT, config)


def read_vae_checkpoint(src: str | os.PathLike | Mapping[str, Any], config: ConfigLike | None = None, *,
                        allow_nonfinite: bool = False) -> Checkpoint:
    """Reads VAE weights and their config (see ``director_jax.convert.checkpoint.read_checkpoint``)."""
    return read_checkpoint(VAE_FORMAT, src, config, allow_nonfinite=allow_nonfinite)


def vae_from_checkpoint(ckpt: Checkpoint, *, dtype: Any = jnp.float32, param_dtype: Any = None) -> WanVAE:
    """Builds the VAE for ``ckpt.config`` and loads the weights; every key must fit exactly."""
    vae = _empty_vae(ckpt.config, dtype, param_dtype or dtype)
    state = ckpt.state
    if ckpt.layout == "official":
        # check in the file's own names, so a missing key is reported as the user knows it
        names = official_key_map(vae)
        expected = {names[k]: entry.torch_shape for k, entry in diffusers_param_table(vae).items()}
        check_state_dict(expected, state, f"{ckpt.source} (official Wan2.1 layout)")
        state = official_to_diffusers(vae, state, ckpt.source)
    load_diffusers_state_dict(vae, state, ckpt.source)
    abstract = [x for x in jax.tree.leaves(nnx.state(vae)) if isinstance(x, jax.ShapeDtypeStruct)]
    assert not abstract, f"{len(abstract)} VAE variables were left unset by the checkpoint"
    return vae


def _empty_vae(config: WanVAEConfig, dtype: Any, param_dtype: Any) -> WanVAE:
    """The VAE with abstract parameters (shapes only), to be filled from a checkpoint.

    Nothing is drawn or allocated only to be overwritten. With dropout the module also holds RNG
    state, which a checkpoint does not carry: then the VAE is initialised for real.
    """
    def build() -> WanVAE:
        return WanVAE(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)

    return build() if config.dropout > 0 else nnx.eval_shape(build)


def load_vae(src: str | os.PathLike | Mapping[str, Any], config: ConfigLike | None = None, *,
             dtype: Any = jnp.float32, param_dtype: Any = None, allow_nonfinite: bool = False) -> WanVAE:
    """The Wan2.1 VAE with the weights of ``src`` (see the module docstring for the sources).

    ``config``: a WanVAEConfig, a diffusers config dict or a config.json path; required for a state
    dict, optional otherwise. ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``)
    that of the parameters. Raises WeightMismatchError when the weights do not fit the config, and a
    ValueError for NaN / infinite weights unless ``allow_nonfinite``.
    """
    return vae_from_checkpoint(read_vae_checkpoint(src, config, allow_nonfinite=allow_nonfinite), dtype=dtype,
                               param_dtype=param_dtype)


def export_vae(vae: WanVAE, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Writes ``vae`` as a diffusers AutoencoderKLWan directory (config.json + float32 or bfloat16 safetensors)."""
    return write_diffusers_dir(out_dir, vae.config.to_diffusers_config(), export_diffusers_state_dict(vae),
                               DIFFUSERS_CLASS, dtype=dtype)


def parameter_count(vae: WanVAE) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
