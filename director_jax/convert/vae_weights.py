"""Wan2.1 VAE weights: this project's NNX tree <-> diffusers' AutoencoderKLWan <-> the official layout.

The diffusers key of every parameter is derived from the module tree (so any config works, not
only the released one); the official ``Wan2.1_VAE.pth`` names are derived from the diffusers ones
by the structure rules of the original code (flat ``downsamples`` / ``upsamples`` lists,
``residual.{0,2,3,6}``, ``middle.{0,1,2}``, ``head.{0,2}``, ``conv1`` / ``conv2`` for the quant convs).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from director_jax.convert.param_table import ParamEntry, export_state_dict, load_state_dict
from director_jax.models.vae import WanVAE, WanVAEConfig
from director_jax.models.vae_blocks import CausalConv3d, Conv2d, RMSNorm, UpBlock


def _module_key(path: tuple) -> str:
    parts = [str(p) for p in path]
    # Resample's 2D conv sits at index 1 of diffusers' nn.Sequential (after the pad / upsample).
    return ".".join("resample.1" if p == "resample" else p for p in parts)


def diffusers_param_table(vae: WanVAE) -> dict[str, ParamEntry]:
    """Maps each diffusers key to where the parameter lives in ``vae`` and how to transpose it.

    Reads only shapes, so ``vae`` may be abstract (``nnx.eval_shape``), as may the ``vae`` that
    ``load_diffusers_state_dict`` fills.
    """
    table: dict[str, ParamEntry] = {}
    for path, module in nnx.iter_graph(vae):
        if not isinstance(module, CausalConv3d | Conv2d | RMSNorm):
            continue
        prefix = _module_key(path)
        if isinstance(module, CausalConv3d):
            kt, kh, kw, cin, cout = module.kernel.get_value().shape
            table[f"{prefix}.weight"] = ParamEntry(path + ("kernel",), (cout, cin, kt, kh, kw),
                                                   lambda a: a.transpose(4, 3, 0, 1, 2),
                                                   lambda a: a.transpose(2, 3, 4, 1, 0))
            table[f"{prefix}.bias"] = ParamEntry(path + ("bias",), (cout,))
        elif isinstance(module, Conv2d):
            kh, kw, cin, cout = module.kernel.get_value().shape
            table[f"{prefix}.weight"] = ParamEntry(path + ("kernel",), (cout, cin, kh, kw),
                                                   lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0))
            table[f"{prefix}.bias"] = ParamEntry(path + ("bias",), (cout,))
        else:
            (dim,) = module.gamma.get_value().shape
            shape = (dim, 1, 1) if module.images else (dim, 1, 1, 1)
            table[f"{prefix}.gamma"] = ParamEntry(path + ("gamma",), shape, lambda a, s=shape: a.reshape(s),
                                                  lambda a: a.reshape(-1))
    return table


def export_diffusers_state_dict(vae: WanVAE) -> dict[str, np.ndarray]:
    """The VAE's parameters as a diffusers AutoencoderKLWan state dict (float32 NumPy)."""
    return export_state_dict(vae, diffusers_param_table(vae))


def load_diffusers_state_dict(vae: WanVAE, state: Mapping[str, np.ndarray], source: str = "state dict") -> WanVAE:
    """Copies a diffusers-layout state dict into ``vae`` in place; every key must fit exactly."""
    return load_state_dict(vae, diffusers_param_table(vae), state, source)


# ------------------------------------------------------------------------------------------------
# The official Wan2.1 layout

_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def official_key_map(vae: WanVAE) -> dict[str, str]:
    """diffusers key -> official Wan2.1 key, for every parameter of ``vae``."""
    flat_upsample_index = {}
    n = 0
    for i, block in enumerate(vae.decoder.up_blocks):
        assert isinstance(block, UpBlock)
        for j in range(len(block.resnets)):
            flat_upsample_index[f"decoder.up_blocks.{i}.resnets.{j}"] = n
            n += 1
        if len(block.upsamplers):
            flat_upsample_index[f"decoder.up_blocks.{i}.upsamplers.0"] = n
            n += 1

    mapping = {}
    for key in diffusers_param_table(vae):
        parts = key.split(".")
        if parts[0] in _TOP:
            mapping[key] = ".".join([_TOP[parts[0]], *parts[1:]])
            continue
        side, rest = parts[0], parts[1:]
        if rest[0] in ("conv_in", "norm_out", "conv_out"):
            new = {"conv_in": ["conv1"], "norm_out": ["head", "0"], "conv_out": ["head", "2"]}[rest[0]] + rest[1:]
        elif rest[0] == "mid_block":
            idx = {"resnets": {"0": "0", "1": "2"}, "attentions": {"0": "1"}}[rest[1]][rest[2]]
            new = ["middle", idx, *rest[3:]]
        elif rest[0] == "down_blocks":
            new = ["downsamples", *rest[1:]]
        elif rest[0] == "up_blocks":
            stem = ".".join(parts[:5])  # decoder.up_blocks.i.resnets.j | decoder.up_blocks.i.upsamplers.0
            new = ["upsamples", str(flat_upsample_index[stem]), *rest[4:]]
        else:
            raise AssertionError(f"unmapped VAE key {key}")
        # residual-block sub-layers: norm1 -> residual.0 etc.
        if len(new) >= 3 and new[-2] in _RESIDUAL:
            new = [*new[:-2], *_RESIDUAL[new[-2]].split("."), new[-1]]
        mapping[key] = ".".join([side, *new])
    return mapping


def looks_official(state: Mapping[str, np.ndarray]) -> bool:
    """True when a state dict uses the official Wan2.1 names rather than diffusers'."""
    return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.")) for k in state)


def official_to_diffusers(vae: WanVAE, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Renames an official-layout state dict to diffusers keys; unknown keys are kept (and reported)."""
    inverse = {v: k for k, v in official_key_map(vae).items()}
    return {inverse.get(k, k): v for k, v in state.items()}


def config_from_official(state: Mapping[str, np.ndarray]) -> WanVAEConfig:
    """Infers base_dim and z_dim of an official Wan2.1 VAE file; the rest is Wan2.1's fixed layout."""
    base_dim = int(state["encoder.conv1.weight"].shape[0])
    z_dim = int(state["conv2.weight"].shape[0])
    return WanVAEConfig(base_dim=base_dim, z_dim=z_dim) if z_dim == 16 else WanVAEConfig(
        base_dim=base_dim, z_dim=z_dim, latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
