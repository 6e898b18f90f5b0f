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

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from director_jax.convert.state_dict import (
    check_state_dict,
    read_diffusers_dir,
    read_state_dict,
    to_numpy,
    write_diffusers_dir,
)
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
LAYOUTS = ("diffusers", "official")

# Keys a diffusers AutoencoderKLWan config may hold besides WanVAEConfig's fields (derived or
# Wan2.2-only settings; from_diffusers_config rejects the Wan2.2 values).
_DIFFUSERS_EXTRA_KEYS = frozenset({"is_residual", "patch_size", "scale_factor_temporal", "scale_factor_spatial"})

ConfigLike = WanVAEConfig | Mapping[str, Any] | str | os.PathLike


@dataclasses.dataclass(frozen=True)
class VAECheckpoint:
    """Weights as read from a source (not yet checked against a model) and the config for them."""

    config: WanVAEConfig
    state: Mapping[str, np.ndarray]
    layout: str  # "diffusers" or "official"
    source: str  # where the weights came from, for messages

    def describe(self) -> str:
        name = {"diffusers": "diffusers layout", "official": "official Wan2.1 layout"}[self.layout]
        return f"{name}, from {self.source}"


def vae_config(config: ConfigLike) -> WanVAEConfig:
    """A WanVAEConfig from a WanVAEConfig, a diffusers config dict, or a path to a config.json."""
    if isinstance(config, WanVAEConfig):
        return config
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist.")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
        if not isinstance(config, Mapping):
            raise ValueError(f"config file {path} must hold a JSON object, not {type(config).__name__}.")
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a WanVAEConfig, a dict or a config.json path; got {type(config).__name__}.")
    _check_class_name(config, "the config")
    fields = {f.name for f in dataclasses.fields(WanVAEConfig)}
    unknown = sorted(k for k in config if k not in fields and k not in _DIFFUSERS_EXTRA_KEYS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown VAE config keys {unknown}; the keys are diffusers' AutoencoderKLWan "
                         f"arguments: {sorted(fields)}.")
    return WanVAEConfig.from_diffusers_config(dict(config))


def _check_class_name(config: Mapping[str, Any], where: str) -> None:
    name = config.get("_class_name")
    if name is not None and name != DIFFUSERS_CLASS:
        raise ValueError(f"{where} is for a {name}, not a {DIFFUSERS_CLASS} (the Wan2.1 VAE).")


def _official_config(state: Mapping[str, np.ndarray], source: str) -> WanVAEConfig:
    needed = [k for k in ("encoder.conv1.weight", "conv2.weight") if k not in state]
    if needed:
        raise ValueError(f"cannot infer the VAE config from {source}: it lacks {', '.join(needed)}. "
                         "Pass the config explicitly (config= / --config).")
    return config_from_official(state)


def read_vae_checkpoint(src: str | os.PathLike | Mapping[str, Any], config: ConfigLike | None = None) -> VAECheckpoint:
    """Reads weights and finds their config; ``config``, when given, wins over any found with them.

    For a bare weight file with no ``config``: an official-layout file's config is inferred from its
    shapes (Wan2.1's fixed block layout); a diffusers-layout file takes the ``config.json`` beside it.
    """
    cfg = vae_config(config) if config is not None else None
    if isinstance(src, Mapping):
        if cfg is None:
            raise ValueError("a state dict carries no config: pass config= (a WanVAEConfig, a diffusers "
                             "config dict, or a config.json path).")
        state = {str(k): to_numpy(v) for k, v in src.items()}
        return VAECheckpoint(cfg, state, _layout(state), "a state dict")

    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.is_dir():
        directory = path
        if not (directory / "config.json").exists() and (directory / "vae" / "config.json").exists():
            directory = directory / "vae"  # a diffusers pipeline directory
        dir_config, state = read_diffusers_dir(directory)
        _check_class_name(dir_config, str(directory / "config.json"))
        cfg = cfg or WanVAEConfig.from_diffusers_config(dir_config)
        return VAECheckpoint(cfg, state, _layout(state), f"diffusers directory {directory}")

    state = read_state_dict(path)
    layout = _layout(state)
    source = f"{path.suffix or 'weight'} file {path}"
    if cfg is None:
        beside = path.parent / "config.json"
        if layout == "official":
            cfg = _official_config(state, str(path))
        elif beside.exists():
            cfg = vae_config(beside)
        else:
            raise ValueError(f"{path} holds diffusers-layout weights but no config: pass the config "
                             "(config= / --config), or put the model's config.json next to the file.")
    return VAECheckpoint(cfg, state, layout, source)


def _layout(state: Mapping[str, np.ndarray]) -> str:
    return "official" if looks_official(state) else "diffusers"


def vae_from_checkpoint(ckpt: VAECheckpoint, *, dtype: Any = jnp.float32, param_dtype: Any = None) -> WanVAE:
    """Builds the VAE for ``ckpt.config`` and loads the weights; every key must fit exactly."""
    vae = _empty_vae(ckpt.config, dtype, param_dtype or dtype)
    state = ckpt.state
    if ckpt.layout == "official":
        # check in the file's own names, so a missing key is reported as the user knows it
        names = official_key_map(vae)
        expected = {names[k]: entry[3] for k, entry in diffusers_param_table(vae).items()}
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
             dtype: Any = jnp.float32, param_dtype: Any = None) -> WanVAE:
    """The Wan2.1 VAE with the weights of ``src`` (see the module docstring for the sources).

    ``config``: a WanVAEConfig, a diffusers config dict or a config.json path; required for a state
    dict, optional otherwise. ``dtype`` is the compute dtype, ``param_dtype`` (default: ``dtype``)
    that of the parameters. Raises WeightMismatchError when the weights do not fit the config.
    """
    return vae_from_checkpoint(read_vae_checkpoint(src, config), dtype=dtype, param_dtype=param_dtype)


def export_vae(vae: WanVAE, out_dir: str | os.PathLike) -> Path:
    """Writes ``vae`` as a diffusers AutoencoderKLWan directory (config.json + float32 safetensors)."""
    return write_diffusers_dir(out_dir, vae.config.to_diffusers_config(), export_diffusers_state_dict(vae),
                               DIFFUSERS_CLASS)


def parameter_count(vae: WanVAE) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
